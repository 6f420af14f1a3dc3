//! The admin endpoint: deploy, list and roll back plugin versions of a running router
//! (`weir deploy`, `weir plugins`, `weir rollback`) and reload its config (`weir reload`), and
//! the plugin registry behind them.
//!
//! Off unless the config has an `[admin]` section; it then listens on `listen` (default
//! `127.0.0.1:4434`: loopback) and requires a token on every request. HTTP/1.1, JSON answers:
//!
//! | request | does |
//! | --- | --- |
//! | `GET /v1/plugins` | every stage: the version serving, the versions kept (digest, name, when deployed, status, batches and failed events since the router started), the last error |
//! | `POST /v1/deploy?pipeline=P&stage=S[&name=N][&probation=B][&state=refuse\|drain][&wait_ms=W]`, body: the component | deploys it (`deploy.rs`); answers with a [`DeployReport`] |
//! | `POST /v1/rollback?pipeline=P&stage=S[&version=V]` | rolls back to version `V` (a digest or 4+ of its hex digits) or to the one before |
//! | `POST /v1/reload` | reads the config file again and applies what changed (`topology/reload.rs`); answers with a [`ReloadReport`] |
//! | `GET /v1/status` | every pipeline, stage and sink with its counters, the version each stage runs, the last reload ([`status::StatusView`], what `weir top` shows) |
//! | `GET /v1/tap?pipeline=P[&stage=S][&sample=N]` | streams the events leaving the pipeline (or its stage `S`) as JSON lines, every `N`th one, until the client goes away; a reader too slow gets `{"tap":{"dropped":N}}` lines instead of what it missed (`pipeline/tap.rs`) |
//!
//! Every request carries `Authorization: Bearer TOKEN`; a missing or wrong token is `401`,
//! an unknown pipeline, stage or version `404`, a deploy to a stage that has one in progress
//! (or a reload that would change it) `409`, a version that cannot serve or a config that
//! cannot be applied `422`; each with `{"error": "..."}` naming the thing and the problem.
//!
//! Decisions:
//!
//! - **Plain HTTP on loopback by default**: the token travels in clear, so an `[admin]
//!   listen` on another interface belongs behind a TLS-terminating proxy or a private network
//!   (docs/SERVE.md). weir logs a warning when it listens on a non-loopback address.
//! - **The component travels in the body**, whole: the router compiles what it received,
//!   never a path on its own disk, so a deploy works the same from another machine.

pub mod client;
pub mod deploy;
pub mod registry;
pub mod status;

use crate::http::{Body, Handler, HttpServer, full};
use crate::pipeline::StateChange;
use crate::pipeline::tap::TapReader;
use bytes::Bytes;
use deploy::{DeployError, DeployOptions, Deployer};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use registry::{ErrorRecord, Status};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use deploy::{DeployReport, Outcome};

/// The admin endpoint's default address: loopback.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4434";
/// The largest component a deploy takes (interpreters built with componentize-py weigh tens
/// of MB).
pub const MAX_COMPONENT_BYTES: usize = 256 << 20;
/// How long the endpoint lets requests in flight finish when it stops.
const GRACE: Duration = Duration::from_secs(5);

/// The `[admin]` section.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the endpoint listens.
    pub listen: SocketAddr,
    /// The token every request must carry.
    pub token: Vec<u8>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// One version of a stage, as `GET /v1/plugins` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionView {
    /// The version (8 hex digits).
    pub version: String,
    /// Its SHA-256.
    pub digest: String,
    /// The plugin's name.
    pub name: String,
    /// `config` or `deploy`.
    pub origin: String,
    /// What became of it.
    pub status: Status,
    /// When it was deployed, ms since the Unix epoch.
    pub deployed_at_ms: i64,
    /// Batches it processed since the router started.
    pub batches: u64,
    /// Events it failed on since the router started.
    pub failed_events: u64,
    /// Why it was rolled back.
    pub error: Option<String>,
}

/// One stage, as `GET /v1/plugins` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageView {
    /// The pipeline.
    pub pipeline: String,
    /// The stage.
    pub stage: String,
    /// Its world (`filter`, `enrich`, `aggregate`).
    pub kind: String,
    /// The version serving (8 hex digits).
    pub serving: String,
    /// The versions kept, oldest first.
    pub versions: Vec<VersionView>,
    /// The last deploy that failed.
    pub last_error: Option<ErrorRecord>,
}

/// The answer to `GET /v1/plugins`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginsView {
    /// Every stage, by pipeline then stage order.
    pub stages: Vec<StageView>,
}

/// What a reload did: the answer to `POST /v1/reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The config file.
    pub path: String,
    /// What changed, a line each; empty: nothing.
    pub changes: Vec<String>,
    /// The stages swapped, as `weir deploy` reports them (on probation: the verdict is in
    /// `weir plugins` and the log).
    pub swaps: Vec<DeployReport>,
    /// What became of the sinks no pipeline writes to any more, and anything that did not go
    /// as planned.
    pub drained: Vec<String>,
    /// What the new config changes that needs a restart, and was left as it is.
    pub restart: Vec<String>,
    /// How long the reload took, in milliseconds.
    pub elapsed_ms: f64,
}

/// What a reload did, in lines (as `weir reload` prints it and `weir serve` logs it).
impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.changes.is_empty() {
            return write!(f, "{}: no changes", self.path);
        }
        write!(f, "{}: reloaded in {:.0} ms", self.path, self.elapsed_ms)?;
        for line in self.changes.iter().chain(&self.drained) {
            write!(f, "\n  {line}")?;
        }
        for swap in &self.swaps {
            for line in swap.to_string().lines() {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

/// Why a reload changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    /// The config file does not read or validate (its error names the file, line and column).
    #[error("{0}")]
    Invalid(String),
    /// A deploy to a stage the new config changes is in progress, or another reload is.
    #[error("{0}")]
    Busy(String),
    /// The config is valid, but something it needs cannot be built (a destination that does
    /// not open, a stage whose `init` refuses its new `with` values).
    #[error("{0}")]
    Refused(String),
    /// The router is stopping.
    #[error("the router is stopping")]
    Stopping,
}

/// What the admin endpoint asks of the running router besides deploys.
pub trait RouterHandle: Send + Sync + 'static {
    /// Reads the config file again and applies what changed.
    fn reload(&self) -> BoxFuture<'_, Result<ReloadReport, ReloadError>>;

    /// Every pipeline, stage and sink with its counters.
    fn status(&self) -> status::StatusView;

    /// A reader of the events leaving `pipeline` (or its stage `stage`), every `sample`th; an
    /// error names the unknown pipeline or stage.
    fn tap(&self, pipeline: &str, stage: Option<&str>, sample: u64) -> Result<TapReader, String>;
}

/// A boxed future, as [`RouterHandle`] returns them.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    /// What went wrong.
    pub error: String,
}

/// The running admin endpoint.
#[derive(Debug)]
pub struct AdminServer(HttpServer);

impl AdminServer {
    /// Listens on `config.listen` and serves the deployer.
    pub async fn start(
        config: &AdminConfig,
        deployer: Arc<Deployer>,
        router: Arc<dyn RouterHandle>,
    ) -> std::io::Result<AdminServer> {
        if !config.listen.ip().is_loopback() {
            tracing::warn!(
                "the admin endpoint listens on {}, not on loopback: its token travels in clear (put it behind TLS or on a private network)",
                config.listen
            );
        }
        let token: Arc<[u8]> = Arc::from(config.token.as_slice());
        let handler: Handler = Arc::new(move |request| {
            let deployer = deployer.clone();
            let router = router.clone();
            let token = token.clone();
            Box::pin(async move { respond(&deployer, router.as_ref(), &token, request).await })
        });
        HttpServer::start("admin endpoint", config.listen, GRACE, handler)
            .await
            .map(AdminServer)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops it; requests in flight get 5 s to finish (a deploy goes on in the router).
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!("{{\"error\":\"admin: cannot encode the answer: {e}\"}}").into_bytes()
    });
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &ErrorView {
            error: message.into(),
        },
    )
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn respond(
    deployer: &Arc<Deployer>,
    router: &dyn RouterHandle,
    token: &[u8],
    request: Request<Incoming>,
) -> Response<Body> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b""));
    match presented {
        None => {
            return error(
                StatusCode::UNAUTHORIZED,
                "admin: no token: send `Authorization: Bearer TOKEN` (weir deploy --token, or WEIR_ADMIN_TOKEN)",
            );
        }
        Some(presented) if !constant_time_eq(presented, token) => {
            return error(StatusCode::UNAUTHORIZED, "admin: wrong token");
        }
        Some(_) => {}
    }
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let allowed = match path.as_str() {
        "/v1/plugins" | "/v1/status" | "/v1/tap" => "GET",
        "/v1/deploy" | "/v1/rollback" | "/v1/reload" => "POST",
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "admin: no such path {path} (there are /v1/plugins, /v1/status, /v1/tap, /v1/deploy, /v1/rollback and /v1/reload)"
                ),
            );
        }
    };
    if method.as_str() != allowed {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("admin: {path} answers {allowed}, not {method}"),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
        return response;
    }
    let need = |key: &str| -> Result<String, String> {
        query
            .get(key)
            .cloned()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("admin: {path} needs `{key}` in its query"))
    };
    let number = |key: &str, default: u64| -> Result<u64, String> {
        match query.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("admin: `{key}` must be a whole number, not `{v}`")),
        }
    };
    let bad_request = |message: String| error(StatusCode::BAD_REQUEST, message);
    let answer = match path.as_str() {
        "/v1/plugins" => return json(StatusCode::OK, &plugins(deployer)),
        "/v1/status" => return json(StatusCode::OK, &router.status()),
        "/v1/tap" => {
            let pipeline = match need("pipeline") {
                Ok(p) => p,
                Err(e) => return bad_request(e),
            };
            let sample = match number("sample", 1) {
                Ok(0) => return bad_request("admin: `sample` must be at least 1".to_owned()),
                Ok(n) => n,
                Err(e) => return bad_request(e),
            };
            let stage = query.get("stage").filter(|s| !s.is_empty());
            return match router.tap(&pipeline, stage.map(String::as_str), sample) {
                Ok(reader) => {
                    let mut response = Response::new(TapBody(reader).boxed());
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/x-ndjson"),
                    );
                    response
                }
                Err(e) => error(StatusCode::NOT_FOUND, format!("admin: {e}")),
            };
        }
        "/v1/reload" => {
            return match router.reload().await {
                Ok(report) => json(StatusCode::OK, &report),
                Err(e) => {
                    let status = match &e {
                        ReloadError::Invalid(_) | ReloadError::Refused(_) => {
                            StatusCode::UNPROCESSABLE_ENTITY
                        }
                        ReloadError::Busy(_) => StatusCode::CONFLICT,
                        ReloadError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    error(status, e.to_string())
                }
            };
        }
        "/v1/deploy" => {
            let (pipeline, stage) = match (need("pipeline"), need("stage")) {
                (Ok(p), Ok(s)) => (p, s),
                (Err(e), _) | (_, Err(e)) => return bad_request(e),
            };
            let defaults = DeployOptions::default();
            let state = match query.get("state").map(String::as_str) {
                None | Some("refuse") => StateChange::Refuse,
                Some("drain") => StateChange::Drain,
                Some(other) => {
                    return bad_request(format!(
                        "admin: `state` is `refuse` or `drain`, not `{other}`"
                    ));
                }
            };
            let options = match (
                number("probation", defaults.probation),
                number("wait_ms", defaults.wait.as_millis() as u64),
            ) {
                (Ok(probation), Ok(wait)) => DeployOptions {
                    probation,
                    state,
                    wait: Duration::from_millis(wait),
                },
                (Err(e), _) | (_, Err(e)) => return bad_request(e),
            };
            let name = query.get("name").cloned().unwrap_or_else(|| stage.clone());
            let body = Limited::new(request.into_body(), MAX_COMPONENT_BYTES);
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes().to_vec(),
                Err(e) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "admin: cannot read the component (at most {MAX_COMPONENT_BYTES} bytes): {e}"
                        ),
                    );
                }
            };
            deployer
                .deploy(&pipeline, &stage, &name, bytes, options)
                .await
        }
        _ => {
            let (pipeline, stage) = match (need("pipeline"), need("stage")) {
                (Ok(p), Ok(s)) => (p, s),
                (Err(e), _) | (_, Err(e)) => return bad_request(e),
            };
            deployer
                .rollback(&pipeline, &stage, query.get("version").map(String::as_str))
                .await
        }
    };
    match answer {
        Ok(report) => json(StatusCode::OK, &report),
        Err(e) => {
            let status = match &e {
                DeployError::NotFound(_) => StatusCode::NOT_FOUND,
                DeployError::Busy(_) => StatusCode::CONFLICT,
                DeployError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
                DeployError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.to_string())
        }
    }
}

/// A tap's events as a streamed response body, a batch's lines per frame.
struct TapBody(TapReader);

impl hyper::body::Body for TapBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_lines(cx)
            .map(|lines| lines.map(|l| Ok(Frame::data(l))))
    }
}

/// Every stage's versions, with their counts since the router started.
pub(crate) fn plugins(deployer: &Deployer) -> PluginsView {
    let records = deployer.registry().stages();
    let mut stages = Vec::new();
    for (pipeline, target) in &deployer.pipelines() {
        for stage in &target.stages {
            let Some(record) = records.get(&format!("{pipeline}/{}", stage.name)) else {
                continue;
            };
            let versions = record
                .versions
                .iter()
                .map(|v| {
                    let version = v.digest.get(..8).unwrap_or_default().to_owned();
                    let (batches, failed_events) =
                        deployer.batches(pipeline, &stage.name, &version);
                    VersionView {
                        version,
                        digest: v.digest.clone(),
                        name: v.name.clone(),
                        origin: v.origin.clone(),
                        status: v.status,
                        deployed_at_ms: v.deployed_at_ms,
                        batches,
                        failed_events,
                        error: v.error.clone(),
                    }
                })
                .collect();
            stages.push(StageView {
                pipeline: pipeline.clone(),
                stage: stage.name.clone(),
                kind: stage.kind.to_string(),
                serving: record.serving.get(..8).unwrap_or_default().to_owned(),
                versions,
                last_error: record.last_error.clone(),
            });
        }
    }
    PluginsView { stages }
}
