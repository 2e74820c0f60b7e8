//! The HTTP server: routes, layers, and serving on a given listener until shutdown.

use std::future::Future;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::ApiKeyLayer;
use crate::config::{LimitsConfig, ServerConfig};
use crate::connections::ConnectionLimits;
use crate::error::ApiError;
use crate::extract::BodyReadTimeout;
use crate::load_shed::{InFlight, LoadShedLayer};
use crate::rate_limit::RateLimitLayer;
use crate::routes;
use crate::state::SharedState;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ])
        .max_age(Duration::from_secs(3600))
}

/// Builds the application's router. Layers run outside-in in the order listed last to
/// first below, so each comment says why a layer sits where it does.
pub fn router(state: SharedState, server: &ServerConfig, limits: &LimitsConfig) -> Router {
    // One bound on requests in flight for the HTTP routes and WebSocket generations.
    let in_flight = InFlight::new(limits.max_concurrent_requests);
    // Everything that reaches a model (or its vocabulary) needs a key. Auth runs per
    // route (route_layer), after routing, so unknown paths are 404 rather than 401, and
    // before any body is parsed, so an anonymous caller costs no JSON parsing.
    // Rate limiting runs inside auth: it needs the identified key.
    let protected = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::completions::completions))
        .route(
            "/v1/chat/completions/render",
            post(routes::render::render_chat),
        )
        .route(
            "/v1/completions/render",
            post(routes::render::render_completion),
        )
        .route("/v1/models", get(routes::models::list_models))
        .route("/v1/responses", post(routes::responses::create_response))
        .route(
            "/v1/responses/{id}",
            get(routes::responses::retrieve_response).delete(routes::responses::delete_response),
        )
        // A wildcard: served names and aliases may hold `/` (`org/model`).
        .route("/v1/models/{*model}", get(routes::models::retrieve_model))
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route_layer(RateLimitLayer)
        .route_layer(ApiKeyLayer::new(state.clone()))
        // Outside auth: a flood is shed before any work, authenticated or not.
        .route_layer(LoadShedLayer::new(in_flight.clone()));
    let mut admin = Router::new().route("/admin/models", get(routes::admin::engines));
    if state.fault_injection {
        admin = admin
            .route(
                "/admin/models/{model}/inject-panic",
                post(routes::admin::inject_panic),
            )
            .route(
                "/admin/models/{model}/inject-stop",
                post(routes::admin::inject_stop),
            );
    }
    let admin = admin
        .route_layer(middleware::from_fn(routes::admin::require_admin))
        .route_layer(ApiKeyLayer::new(state.clone()));
    // `/metrics` names keys and models: with `[metrics] require_key` it takes an admin
    // or scrape key (its own check, which keeps answering while draining).
    let metrics = Router::new()
        .route("/metrics", get(crate::metrics::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            routes::admin::require_metrics_key,
        ));
    Router::new()
        .route("/", get(routes::page::index))
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .merge(metrics)
        // The WebSocket authenticates itself: browsers cannot send headers on it. Its
        // generations take their place in flight themselves (the socket holds none).
        .route(
            "/v1/ws",
            get(routes::ws::ws_upgrade).layer(Extension(in_flight)),
        )
        .merge(protected)
        .merge(admin)
        .fallback(|req: Request| async move {
            ApiError::RouteNotFound(req.uri().path().to_string()).into_response()
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::MethodNotAllowed(req.method().to_string(), req.uri().path().to_string())
                .into_response()
        })
        // Counts every answer by route and status, refusals included.
        .layer(middleware::from_fn(crate::metrics::count_http))
        // A panicking handler answers 500 in OpenAI's format instead of dropping the
        // connection; the panic itself goes to the logs.
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::Internal("the request handler failed".into()).into_response()
        }))
        .layer(Extension(BodyReadTimeout(Duration::from_secs(
            limits.body_read_timeout_seconds,
        ))))
        // Innermost: bodies larger than the limit are refused while being read (413),
        // never buffered whole.
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        // CORS answers preflights before auth: browsers send them without credentials.
        .layer(cors(&server.cors_origins))
        // Tracing sees every request, including refused ones, with its request id. It
        // logs method, path, status and latency only: never bodies (prompts) or headers
        // (keys).
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        // Outermost: every request gets an id (the client's `x-request-id` if it sent
        // one), echoed on the response, so client reports can be matched to logs.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Serves `state` on `listener` (over TLS when `tls` is given) until `shutdown`
/// resolves, then lets open responses finish.
pub async fn serve(
    listener: TcpListener,
    state: SharedState,
    server: ServerConfig,
    limits: LimitsConfig,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let conn_limits = ConnectionLimits {
        max_connections: limits.max_connections,
        header_read_timeout: Duration::from_secs(limits.header_read_timeout_seconds),
        write_stall_timeout: Duration::from_secs(limits.write_stall_timeout_seconds),
        tls_handshake_timeout: Duration::from_secs(limits.tls_handshake_timeout_seconds),
        http2_max_concurrent_streams: limits.http2_max_concurrent_streams,
    };
    crate::connections::serve(
        listener,
        router(state, &server, &limits),
        conn_limits,
        tls,
        shutdown,
    )
    .await
}
