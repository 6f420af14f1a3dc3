//! An embedded HTTP receiver: the other end of the http sink, for `weir demo` and tests.
//!
//! [`Receiver`] is a small HTTP/1.1 server (hyper on the caller's tokio runtime) that takes
//! what the http sink sends (see `sinks::http`): a `POST` at any path whose body is a JSON
//! array of events, each an object of the `weir_format::json` shape. For each request it
//!
//! - reads the body, at most [`ReceiverOptions::max_body_bytes`] (more: `413`);
//! - parses it as a JSON array and every element as an event (anything else: `400`, with a
//!   plain-text message naming the problem and, for a bad element, its position);
//! - appends the events as JSON lines to [`ReceiverOptions::output`], if set (a write failure
//!   answers `500`, which the sender retries);
//! - counts them, keeps them for [`Receiver::received`] if [`ReceiverOptions::keep`] is set,
//!   and answers `200` with `{"events":N}`.
//!
//! Other methods answer `405`. A request whose headers do not arrive within 10 s, or whose
//! body does not within 60 s, is dropped (`408` for the body). [`Receiver::answer_with`] makes
//! it answer every request with a chosen status instead (to test how senders handle `503` or
//! `400`), and [`Receiver::stop`] stops it for good, closing every connection, so that senders
//! see connection failures; a new receiver may then start on the same address.

use crate::http::{Handler, HttpServer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The default [`ReceiverOptions::max_body_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

/// How long a client may take to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a [`Receiver`] does with the events it takes.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Append every event as a JSON line (`weir_format::json`) to this file, created if
    /// missing (its directory is not).
    pub output: Option<PathBuf>,
    /// Keep every event in memory, for [`Receiver::received`] (tests).
    pub keep: bool,
    /// The largest request body taken; a larger one is answered `413`.
    pub max_body_bytes: usize,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            output: None,
            keep: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// A running receiver; see the module documentation. Dropping it stops it too, without
/// waiting for its connections to close ([`Receiver::stop`] waits).
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<State>,
    server: HttpServer,
}

#[derive(Debug)]
struct State {
    output: Option<(PathBuf, tokio::sync::Mutex<tokio::fs::File>)>,
    keep: Option<Mutex<Vec<serde_json::Value>>>,
    max_body_bytes: usize,
    answer: Mutex<Option<(StatusCode, String)>>,
    events: AtomicU64,
    requests: AtomicU64,
}

impl Receiver {
    /// Listens on `addr` (port 0 picks a free port) and serves on the current tokio runtime.
    /// Fails if the address cannot be bound or the output file cannot be opened; the error
    /// names which.
    pub async fn start(addr: SocketAddr, options: ReceiverOptions) -> std::io::Result<Receiver> {
        let output = match options.output {
            None => None,
            Some(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("receiver: cannot open {}: {e}", path.display()),
                        )
                    })?;
                Some((path, tokio::sync::Mutex::new(file)))
            }
        };
        let state = Arc::new(State {
            output,
            keep: options.keep.then(|| Mutex::new(Vec::new())),
            max_body_bytes: options.max_body_bytes,
            answer: Mutex::new(None),
            events: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let handling = state.clone();
        let handler: Handler = Arc::new(move |request| {
            let state = handling.clone();
            Box::pin(async move { handle(&state, request).await.map(BodyExt::boxed) })
        });
        // No grace: a stopped receiver is a dead destination, mid-request included.
        let server = HttpServer::start("receiver", addr, Duration::ZERO, handler).await?;
        Ok(Receiver {
            addr: server.local_addr(),
            state,
            server,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A URL to send to: `http://ADDR/ingest` (any path is taken).
    pub fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    /// Events taken (answered `200`) so far.
    pub fn events(&self) -> u64 {
        self.state.events.load(Ordering::Relaxed)
    }

    /// Requests answered so far, whatever the answer.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Every event taken, in the order taken, as JSON objects; empty unless
    /// [`ReceiverOptions::keep`] is set.
    pub fn received(&self) -> Vec<serde_json::Value> {
        match &self.state.keep {
            Some(kept) => kept.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            None => Vec::new(),
        }
    }

    /// From now on, answers every request with `status` and `body` (plain text), taking no
    /// events, until [`Receiver::answer_normally`].
    pub fn answer_with(&self, status: StatusCode, body: impl Into<String>) {
        *self
            .state
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((status, body.into()));
    }

    /// Takes events again (after [`Receiver::answer_with`]).
    pub fn answer_normally(&self) {
        *self
            .state
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Stops listening and closes every connection (a request in progress gets no answer),
    /// and returns once they are closed: the address is free to listen on again.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let response = answer(state, request).await;
    state.requests.fetch_add(1, Ordering::Relaxed);
    response
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::POST {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not accepted: POST a JSON array of events\n",
                request.method()
            ),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let max = state.max_body_bytes;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {max} bytes\n"),
        )
    };
    let body = request.into_body();
    if body.size_hint().lower() > max as u64 {
        return too_large();
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max).collect()).await {
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_TIMEOUT:?}\n"),
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let forced = state
        .answer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some((status, message)) = forced {
        return text(status, message);
    }
    let events = match parse(&body, state.keep.is_some()) {
        Ok(events) => events,
        Err(message) => return text(StatusCode::BAD_REQUEST, format!("{message}\n")),
    };
    if let Some((path, file)) = &state.output {
        let mut lines = String::new();
        for (_, event) in &events {
            lines.push_str(&weir_format::json::event_to_line(event));
            lines.push('\n');
        }
        let mut file = file.lock().await;
        let written = async {
            file.write_all(lines.as_bytes()).await?;
            file.flush().await
        };
        if let Err(e) = written.await {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write to {}: {e}\n", path.display()),
            );
        }
    }
    if let Some(kept) = &state.keep {
        let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.extend(events.iter().filter_map(|(value, _)| value.clone()));
    }
    state
        .events
        .fetch_add(events.len() as u64, Ordering::Relaxed);
    let mut response = text(StatusCode::OK, format!("{{\"events\":{}}}", events.len()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The events of a body, each as an event and (when `keep`) as JSON; the error is the `400`
/// message.
fn parse(
    body: &[u8],
    keep: bool,
) -> Result<Vec<(Option<serde_json::Value>, weir_format::Event)>, String> {
    let elements: Vec<&RawValue> = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a JSON array of events: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let count = elements.len();
    elements
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let at = || format!("event {} of {count}", i + 1);
            let event = weir_format::json::parse_line(raw.get(), now)
                .map_err(|e| format!("{} is not an event: {e}", at()))?;
            let value = if keep {
                Some(
                    serde_json::from_str(raw.get())
                        .map_err(|e| format!("{} is not an event: {e}", at()))?,
                )
            } else {
                None
            };
            Ok((value, event))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(url: &str, body: &'static str) -> (u16, String) {
        let response = reqwest::Client::new()
            .post(url)
            .body(body)
            .send()
            .await
            .expect("the receiver answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("a text body"))
    }

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn takes_an_array_of_events_and_appends_them_as_json_lines() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("received.jsonl");
        let options = ReceiverOptions {
            output: Some(path.clone()),
            keep: true,
            ..ReceiverOptions::default()
        };
        let receiver = Receiver::start(local(), options).await.expect("starts");
        let body = r#"[{"value":{"a":1},"timestamp_ms":5,"key":"k"},
            {"value_text":"plain","timestamp_ms":6,"headers":{"h":"v"},"route":"eu"}]"#;
        assert_eq!(
            post(&receiver.url(), body).await,
            (200, r#"{"events":2}"#.to_owned())
        );
        assert_eq!(
            post(
                &format!("http://{}/other/path", receiver.local_addr()),
                "[]"
            )
            .await,
            (200, r#"{"events":0}"#.to_owned())
        );
        assert_eq!((receiver.events(), receiver.requests()), (2, 2));
        assert_eq!(
            receiver.received(),
            vec![
                serde_json::json!({"value":{"a":1},"timestamp_ms":5,"key":"k"}),
                serde_json::json!({
                    "value_text": "plain",
                    "timestamp_ms": 6,
                    "headers": {"h": "v"},
                    "route": "eu",
                }),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("the output file"),
            concat!(
                r#"{"key":"k","value":{"a":1},"timestamp_ms":5}"#,
                "\n",
                r#"{"value_text":"plain","timestamp_ms":6,"headers":{"h":"v"},"route":"eu"}"#,
                "\n",
            )
        );
        receiver.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_what_is_not_an_array_of_events_and_bodies_over_the_limit() {
        let options = ReceiverOptions {
            keep: true,
            max_body_bytes: 64,
            ..ReceiverOptions::default()
        };
        let receiver = Receiver::start(local(), options).await.expect("starts");
        let url = receiver.url();
        assert_eq!(
            post(&url, r#"{"value":1}"#).await,
            (
                400,
                "the body is not a JSON array of events: invalid type: map, expected a sequence \
                 at line 1 column 0\n"
                    .to_owned()
            )
        );
        assert_eq!(
            post(&url, r#"[{"value":1,"timestamp_ms":1},{"valu":2}]"#).await,
            (
                400,
                "event 2 of 2 is not an event: unknown field `valu`, expected one of `key`, \
                 `key_b64`, `value`, `value_text`, `value_b64`, `timestamp_ms`, `headers`, \
                 `route` at line 1 column 7\n"
                    .to_owned()
            )
        );
        assert_eq!(
            post(
                &url,
                "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]"
            )
            .await,
            (413, "the body is larger than 64 bytes\n".to_owned())
        );
        let response = reqwest::get(&url).await.expect("the receiver answers");
        assert_eq!(response.status().as_u16(), 405);
        assert_eq!(response.headers()["allow"], "POST");
        assert_eq!((receiver.events(), receiver.requests()), (0, 4));
        assert!(receiver.received().is_empty());
        receiver.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_a_chosen_status_until_told_otherwise() {
        let receiver = Receiver::start(local(), ReceiverOptions::default())
            .await
            .expect("starts");
        receiver.answer_with(StatusCode::SERVICE_UNAVAILABLE, "busy");
        let event = r#"[{"value":1,"timestamp_ms":1}]"#;
        assert_eq!(post(&receiver.url(), event).await, (503, "busy".to_owned()));
        receiver.answer_normally();
        assert_eq!(
            post(&receiver.url(), event).await,
            (200, r#"{"events":1}"#.to_owned())
        );
        assert_eq!((receiver.events(), receiver.requests()), (1, 2));
        receiver.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn names_an_output_file_it_cannot_open() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("missing").join("out.jsonl");
        let options = ReceiverOptions {
            output: Some(path.clone()),
            ..ReceiverOptions::default()
        };
        let error = Receiver::start(local(), options)
            .await
            .expect_err("the directory does not exist");
        assert_eq!(
            error.to_string(),
            format!(
                "receiver: cannot open {}: No such file or directory (os error 2)",
                path.display()
            )
        );
    }
}
