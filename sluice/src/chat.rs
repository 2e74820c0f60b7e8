//! `sluice chat`: a terminal chat that streams replies as they decode, or joins a
//! collaborative session and shows everyone's messages and the shared reply live.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use sluice_client::{ChatMessage, ChatRequest, Client, Sampling, SessionEvent};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `sluice chat` options.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// Server to talk to.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (the development key works against a local server without keys).
    #[arg(
        long,
        env = "SLUICE_API_KEY",
        default_value = "sk-sluice-dev",
        hide_env_values = true
    )]
    api_key: String,
    /// Model name (default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    /// System prompt for a private chat.
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Join this collaborative session instead of a private chat (needs --user).
    #[arg(long, requires = "user")]
    session: Option<String>,
    /// Your name in the session.
    #[arg(long)]
    user: Option<String>,
}

impl ChatArgs {
    fn sampling(&self) -> Sampling {
        Sampling {
            model: self.model.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            ..Sampling::default()
        }
    }
}

fn prompt(interactive: bool) {
    if interactive {
        print!("> ");
        let _ = std::io::stdout().flush();
    }
}

/// Runs the chat until end of input (or Ctrl-C at the prompt).
pub async fn run_cli(args: ChatArgs) -> Result<()> {
    let client = Client::new(&args.url, Some(args.api_key.clone()));
    match (&args.session, &args.user) {
        (Some(s), Some(u)) => session(&client, &args, s, u).await,
        _ => private(&client, &args).await,
    }
}

async fn private(client: &Client, args: &ChatArgs) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let mut messages: Vec<ChatMessage> = args.system.iter().map(ChatMessage::system).collect();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        prompt(interactive);
        let line = tokio::select! {
            l = lines.next_line() => l.context("reading stdin")?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else {
            return Ok(());
        };
        if line.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::user(line));
        let req = ChatRequest {
            messages: messages.clone(),
            sampling: args.sampling(),
        };
        let mut stream = match client.chat_stream(&req).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
                continue;
            }
        };
        let mut reply = String::new();
        loop {
            tokio::select! {
                chunk = stream.next() => match chunk {
                    Some(Ok(c)) => {
                        print!("{}", c.text());
                        let _ = std::io::stdout().flush();
                        reply.push_str(c.text());
                    }
                    Some(Err(e)) => {
                        eprintln!("\nerror: {e}");
                        break;
                    }
                    None => break,
                },
                // Ctrl-C stops this reply (dropping the stream cancels it on the server).
                _ = tokio::signal::ctrl_c() => {
                    print!(" [cancelled]");
                    break;
                }
            }
        }
        println!();
        messages.push(ChatMessage::assistant(reply));
    }
}

async fn session(client: &Client, args: &ChatArgs, name: &str, user: &str) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let (mut tx, mut rx) = client
        .join_session(name, user)
        .await
        .with_context(|| format!("joining session {name}"))?
        .split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut generating = false;
    loop {
        tokio::select! {
            ev = rx.next_event() => match ev? {
                None => {
                    println!("* the server closed the connection");
                    return Ok(());
                }
                Some(ev) => {
                    let done = matches!(ev, SessionEvent::GenerationDone { .. });
                    generating = matches!(ev, SessionEvent::GenerationStarted { .. }) || (generating && !done);
                    show(&ev, user);
                    // Without a terminal, leave once our input is used up and the reply is in.
                    if !stdin_open && !generating && (done || !interactive) {
                        return Ok(());
                    }
                }
            },
            line = lines.next_line(), if stdin_open => match line.context("reading stdin")? {
                None => {
                    stdin_open = false;
                    if !generating && !interactive {
                        return Ok(());
                    }
                }
                Some(l) if l.trim() == "/quit" => return Ok(tx.leave().await?),
                Some(l) if l.trim() == "/cancel" => tx.cancel().await?,
                Some(l) if l.trim().is_empty() => {}
                Some(l) => {
                    tx.say(&l).await?;
                    tx.generate(&args.sampling()).await?;
                    generating = true;
                }
            },
            _ = tokio::signal::ctrl_c() => {
                if generating {
                    tx.cancel().await?;
                } else {
                    return Ok(tx.leave().await?);
                }
            }
        }
    }
}

fn show(ev: &SessionEvent, me: &str) {
    match ev {
        SessionEvent::Session {
            session,
            messages,
            participants,
            generation,
        } => {
            println!("* session {session}, here: {}", participants.join(", "));
            for m in messages {
                println!("[{}] {}", m.user.as_deref().unwrap_or(&m.role), m.content);
            }
            if let Some(g) = generation {
                print!("[assistant, for {}] {}", g.by, g.text);
            }
        }
        SessionEvent::ParticipantJoined { user } if user != me => println!("* {user} joined"),
        SessionEvent::ParticipantLeft { user } => println!("* {user} left"),
        SessionEvent::Message { user, content, .. } if user.as_deref() != Some(me) => {
            println!("[{}] {content}", user.as_deref().unwrap_or("?"))
        }
        SessionEvent::GenerationStarted { by, .. } => print!("[assistant, for {by}] "),
        SessionEvent::Token { text, .. } => print!("{text}"),
        SessionEvent::GenerationDone { finish_reason, .. } => {
            if finish_reason == "cancelled" {
                print!(" [cancelled]");
            }
            println!();
        }
        SessionEvent::Error { code, message } => eprintln!("! {code}: {message}"),
        _ => {}
    }
    let _ = std::io::stdout().flush();
}
