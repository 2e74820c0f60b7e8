//! `[[upstreams]]` and `[upstream]`: other OpenAI-compatible servers the gateway forwards
//! requests to, and how it talks to them. Checked with the rest of the configuration
//! (`Config::validate`), and once more after the upstreams' models are discovered.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Config, ConfigError};

/// One `[[upstreams]]` entry: a server (replica) and the models it serves.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// The server's root, `http://host:port` (requests go to `URL/v1/...`).
    pub url: String,
    /// The key the gateway sends it (`Authorization: Bearer`); clients' keys never are.
    pub api_key: Option<String>,
    /// The same, from this environment variable.
    pub api_key_env: Option<String>,
    /// The same, from this file (surrounding whitespace removed).
    pub api_key_file: Option<PathBuf>,
    /// The models it serves; when absent, discovered from its `GET /v1/models` at start-up.
    pub models: Option<Vec<String>>,
}

// By hand: the key must never reach a log through `{:?}` of the configuration.
impl std::fmt::Debug for UpstreamEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamEntry")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_env", &self.api_key_env)
            .field("api_key_file", &self.api_key_file)
            .field("models", &self.models)
            .finish()
    }
}

impl UpstreamEntry {
    /// The root URL without a trailing `/`.
    pub fn base(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// The key to send, from whichever of `api_key`, `api_key_env`, `api_key_file` is set.
    pub fn resolve_api_key(&self) -> Result<Option<String>, String> {
        if let Some(k) = &self.api_key {
            return Ok(Some(k.clone()));
        }
        if let Some(var) = &self.api_key_env {
            return std::env::var(var)
                .map(|k| Some(k.trim().to_string()))
                .map_err(|_| format!("api_key_env names {var:?}, which is not set"));
        }
        if let Some(path) = &self.api_key_file {
            return std::fs::read_to_string(path)
                .map(|k| Some(k.trim().to_string()))
                .map_err(|e| format!("api_key_file {}: {e}", path.display()));
        }
        Ok(None)
    }
}

/// `[upstream]`: timeouts, health checks and the routing policy's knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// Time to open a TCP connection to an upstream before trying the next replica.
    pub connect_timeout_seconds: u64,
    /// Time a streaming request waits for the upstream's response headers before trying
    /// the next replica, and, once streaming, the longest gap between two chunks before
    /// the stream is ended with an error event. Non-streaming requests are bounded by
    /// `limits.request_timeout_seconds` instead.
    pub first_byte_timeout_seconds: u64,
    /// Every this many seconds each upstream's `GET /ready` (health) and `GET /metrics`
    /// (its queue) are read.
    pub health_check_seconds: u64,
    /// Prompts at least this many bytes long are routed by a hash of their first this
    /// many bytes (prefix/cache affinity); 0 turns affinity off.
    pub affinity_prefix_bytes: usize,
    /// The affine replica is taken only while its load (requests) is at most the
    /// least-loaded replica's plus this.
    pub affinity_slack: u64,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout_seconds: 3,
            first_byte_timeout_seconds: 60,
            health_check_seconds: 2,
            affinity_prefix_bytes: 512,
            affinity_slack: 2,
        }
    }
}

impl UpstreamSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.first_byte_timeout_seconds)
    }
    pub fn health_check_interval(&self) -> Duration {
        Duration::from_secs(self.health_check_seconds)
    }
}

/// Problems with `[[upstreams]]` and `[upstream]`, for `Config::validate`. Names the
/// upstreams' listed models share with local ones are reported here; discovered ones by
/// [`check_discovered`].
pub fn problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let s = &config.upstream;
    for (name, v) in [
        (
            "upstream.connect_timeout_seconds",
            s.connect_timeout_seconds,
        ),
        (
            "upstream.first_byte_timeout_seconds",
            s.first_byte_timeout_seconds,
        ),
        ("upstream.health_check_seconds", s.health_check_seconds),
    ] {
        if v == 0 {
            problems.push(format!("{name} must be at least 1"));
        }
    }
    let mut urls = std::collections::HashSet::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let at = format!("upstreams[{i}] ({})", u.url);
        match reqwest::Url::parse(u.base()) {
            Ok(url) if url.scheme() == "http" && url.host().is_some() => {}
            Ok(url) if url.scheme() == "https" => problems.push(format!(
                "{at}: https upstreams are not supported by this build (its HTTP client has \
                 no TLS); use http:// on a private network"
            )),
            _ => problems.push(format!(
                "{at}: url must be an http:// URL of the server's root, like http://10.0.0.5:8080"
            )),
        }
        if !urls.insert(u.base().to_string()) {
            problems.push(format!("{at}: the same url is listed twice"));
        }
        let sources = [
            u.api_key.is_some(),
            u.api_key_env.is_some(),
            u.api_key_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            problems.push(format!(
                "{at}: set at most one of api_key, api_key_env and api_key_file"
            ));
        } else if let Err(e) = u.resolve_api_key() {
            problems.push(format!("{at}: {e}"));
        }
        match &u.models {
            Some(list) if list.is_empty() => problems.push(format!(
                "{at}: models = [] serves nothing; list its models, or leave models out to \
                 discover them from its /v1/models"
            )),
            Some(list) if list.iter().any(|m| m.trim().is_empty()) => {
                problems.push(format!("{at}: model names must not be empty"))
            }
            _ => {}
        }
    }
    let listed: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| u.models.iter().flatten().cloned())
        .collect();
    problems.extend(collisions(config, &listed));
    problems
}

/// Whether some upstream's models are only known once it is asked (so allow-lists
/// naming models not served locally are checked after discovery).
pub fn discovery_pending(config: &Config) -> bool {
    config.upstreams.iter().any(|u| u.models.is_none())
}

/// Upstream model names that a local model also uses (name or alias).
fn collisions(config: &Config, upstream_models: &[String]) -> Vec<String> {
    let local: std::collections::HashSet<&str> = config
        .models
        .iter()
        .flat_map(|m| std::iter::once(&m.name).chain(&m.aliases))
        .map(String::as_str)
        .collect();
    let mut seen = std::collections::HashSet::new();
    upstream_models
        .iter()
        .filter(|m| local.contains(m.as_str()) && seen.insert(m.as_str()))
        .map(|m| {
            format!(
                "model {m:?} is served both locally ([[models]]) and by an upstream; \
                 rename one (requests could not tell which is meant)"
            )
        })
        .collect()
}

/// After discovery: every upstream model name (`upstream_models`) against the local
/// ones, and the keys' allow-lists against local and upstream names together.
pub fn check_discovered(config: &Config, upstream_models: &[String]) -> Result<(), ConfigError> {
    let mut problems = collisions(config, upstream_models);
    let local: Vec<String> = config
        .served_models()
        .into_iter()
        .flat_map(|m| std::iter::once(m.name).chain(m.aliases))
        .collect();
    let served: std::collections::HashSet<&str> = local
        .iter()
        .chain(upstream_models)
        .map(String::as_str)
        .collect();
    let mut listed: Vec<&str> = served.iter().copied().collect();
    listed.sort_unstable();
    let listed = listed
        .iter()
        .map(|m| format!("{m:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    problems.extend(crate::config::unserved_allowed_models(
        &config.keys,
        &served,
        &listed,
    ));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Config {
        toml::from_str(s).expect("parses")
    }

    fn all_problems(c: &Config) -> String {
        match c.validate() {
            Err(ConfigError::Invalid(p)) => p.join("\n"),
            other => panic!("should be invalid: {other:?}"),
        }
    }

    const HASH: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

    #[test]
    fn upstreams_parse_and_replace_the_default_model() {
        let c = parse(
            r#"
            [upstream]
            health_check_seconds = 1
            [[upstreams]]
            url = "http://127.0.0.1:9001/"
            api_key = "sk-up"
            models = ["m1"]
            [[upstreams]]
            url = "http://127.0.0.1:9002"
            "#,
        );
        c.validate().expect("valid");
        assert!(
            c.served_models().is_empty(),
            "no local model, not the default"
        );
        assert_eq!(c.upstreams[0].base(), "http://127.0.0.1:9001");
        assert_eq!(
            c.upstreams[0].resolve_api_key().unwrap().as_deref(),
            Some("sk-up")
        );
        assert_eq!(c.upstreams[1].resolve_api_key().unwrap(), None);
        assert!(discovery_pending(&c));
        assert!(!format!("{c:?}").contains("sk-up"), "the key is redacted");
        // Neither models nor upstreams: the default model, as before.
        assert_eq!(parse("").served_models().len(), 1);
    }

    #[test]
    fn bad_upstreams_are_reported() {
        let c = parse(
            r#"
            [upstream]
            connect_timeout_seconds = 0
            [[upstreams]]
            url = "https://example.com"
            [[upstreams]]
            url = "10.0.0.1:80"
            api_key = "a"
            api_key_env = "B"
            [[upstreams]]
            url = "http://a:1"
            api_key_env = "SLUICE_TEST_SURELY_UNSET_VARIABLE"
            models = []
            [[upstreams]]
            url = "http://a:1/"
            models = ["local"]
            [[models]]
            name = "local"
            engine = "synthetic"
            "#,
        );
        let p = all_problems(&c);
        for want in [
            "upstream.connect_timeout_seconds must be at least 1",
            "https upstreams are not supported",
            "url must be an http:// URL",
            "at most one of api_key",
            "SLUICE_TEST_SURELY_UNSET_VARIABLE",
            "models = [] serves nothing",
            "the same url is listed twice",
            "\"local\" is served both locally",
        ] {
            assert!(p.contains(want), "missing {want:?} in:\n{p}");
        }
    }

    #[test]
    fn allow_lists_count_upstream_models() {
        let key = |models: &str, upstream_models: &str| {
            parse(&format!(
                "[[keys]]\nname = \"k\"\nkey_sha256 = \"{HASH}\"\nmodels = {models}\n\
                 [[upstreams]]\nurl = \"http://h:1\"\n{upstream_models}\n"
            ))
        };
        key(r#"["m1"]"#, r#"models = ["m1"]"#)
            .validate()
            .expect("a listed upstream model");
        let p = all_problems(&key(r#"["m2"]"#, r#"models = ["m1"]"#));
        assert!(p.contains("allows model \"m2\""), "{p}");
        // Discovered later: the check waits for discovery...
        let c = key(r#"["m2"]"#, "");
        c.validate().expect("checked after discovery");
        // ...which then knows.
        check_discovered(&c, &["m2".into()]).expect("discovered");
        let e = check_discovered(&c, &["m1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("allows model \"m2\"") && e.contains("m1"), "{e}");
    }
}
