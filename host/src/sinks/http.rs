//! The http sink: POSTs events, as a JSON array, to an HTTP endpoint.
//!
//! # The request
//!
//! Each delivery the runner hands over (one or more batches' worth of events) is **one**
//! request:
//!
//! ```text
//! POST <url> HTTP/1.1
//! content-type: application/json
//! user-agent: weir/<version>
//! <each configured header>
//!
//! [{"key":"u7","value":{"path":"/"},"timestamp_ms":1700000000000,"route":"eu"},{"value_text":"hi","timestamp_ms":1700000000001,"headers":{"h":"v"}}]
//! ```
//!
//! - The body is a JSON array of event objects, in order, each exactly the JSON line
//!   `weir_format::json` defines (the file sink's lines, `weir send --file`'s input): `value`
//!   carries the event's bytes verbatim when they are one JSON text, else `value_text` or
//!   `value_b64`; `key` (or `key_b64`), `headers` and `route` are absent when unset. The array has
//!   no whitespace between its elements, and is never empty (nothing to send sends nothing).
//! - Configured headers are added to every request; a configured `content-type` replaces the
//!   default one. Proxies are taken from `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`, as curl does.
//! - Redirects are not followed (a POST must not turn into a GET).
//!
//! # The answer
//!
//! - `2xx`: the endpoint has every event of the request.
//! - `5xx`, `408`, `429`, no answer within `timeout` (the whole exchange: connecting, sending,
//!   the answer's headers and body), a connection failure: retried (`SendError::Retry`), with
//!   backoff, by the sink's runner. Retrying may deliver a request twice (at least once).
//! - `401`, `403`, `404`, `405`, `407`: the endpoint refuses the sink itself (credentials, URL),
//!   not these events: retried, with a message saying to check `url` and `headers`, so that a
//!   config mistake holds the events instead of dead-lettering every one of them.
//! - Any other `4xx`: the endpoint refused the events (`SendError::Reject`): the runner narrows
//!   the request down to the refused events and dead-letters them with the message, which
//!   names the sink, the URL, the status and the first 200 bytes of the answer's body.
//! - `3xx` (and any other status): retried, with a message naming the status and where it
//!   points, since the events were not taken and the URL must be fixed.

use super::{Destination, OpenError, Outgoing, SendError, SendFuture};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::{Client, StatusCode, Url};
use std::error::Error as _;
use std::time::Duration;

/// `type = "http"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Where batches are POSTed (`http://` or `https://`).
    pub url: String,
    /// Extra request headers (name, value), e.g. `authorization`.
    pub headers: Vec<(String, String)>,
    /// Time one request may take before it is retried.
    pub timeout: Duration,
}

/// How much of an error answer's body goes into the message.
const EXCERPT_BYTES: usize = 200;
/// How much of a success answer's body is read (so the connection can be reused); a longer
/// body is left unread and its connection closed.
const DRAIN_BYTES: usize = 64 << 10;

/// POSTs events to one URL; see the module documentation for the request and how answers
/// are taken. (Not `Debug`: its headers may hold credentials.)
pub struct HttpDestination {
    sink: String,
    url: Url,
    headers: HeaderMap,
    timeout: Duration,
    client: Client,
}

impl HttpDestination {
    /// Checks the config (an `http` or `https` URL, valid header names and values) and builds
    /// the client; nothing connects until the first send.
    pub fn open(name: &str, config: &HttpConfig) -> Result<HttpDestination, OpenError> {
        let error = |message: String| OpenError {
            sink: name.to_owned(),
            what: format!("http {}", config.url),
            message,
        };
        let url = Url::parse(&config.url).map_err(|e| error(format!("invalid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(error(format!(
                "the URL's scheme is `{}`, expected `http` or `https`",
                url.scheme()
            )));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| error(format!("`{name}` is not a valid header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| error(format!("the value of header `{name}` is not valid")))?;
            headers.append(header, value);
        }
        let client = Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("weir/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| error(format!("cannot build the HTTP client: {}", chain(&e))))?;
        Ok(HttpDestination {
            sink: name.to_owned(),
            url,
            headers,
            timeout: config.timeout,
            client,
        })
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), SendError> {
        let response = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Retry(self.failure(&e)))?;
        let status = response.status();
        if status.is_success() {
            drain(response).await;
            return Ok(());
        }
        let location = response
            .headers()
            .get(LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
        let excerpt = excerpt(response).await;
        let mut message = format!(
            "sink `{}`: {} answered {}",
            self.sink,
            self.url,
            status_text(status)
        );
        if let Some(location) = location.filter(|_| status.is_redirection()) {
            message.push_str(&format!(
                " (to {location}; redirects are not followed: set `url` to where it points)"
            ));
        }
        if !excerpt.is_empty() {
            message.push_str(": ");
            message.push_str(&excerpt);
        }
        // These say the endpoint refuses the sink (its credentials, its URL), not these
        // events: dead-lettering every event for a config mistake would be worse than waiting.
        let sink_refused = matches!(status.as_u16(), 401 | 403 | 404 | 405 | 407);
        if sink_refused {
            message.push_str(" (the endpoint refuses the sink, not these events: check its `url` and `headers`; retrying)");
        }
        let refused = status.is_client_error()
            && !sink_refused
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS;
        Err(if refused {
            SendError::Reject(message)
        } else {
            SendError::Retry(message)
        })
    }

    /// The message for a request that got no answer.
    fn failure(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            format!(
                "sink `{}`: {} did not answer within {:?}",
                self.sink, self.url, self.timeout
            )
        } else if error.is_connect() {
            format!(
                "sink `{}`: cannot connect to {}: {}",
                self.sink,
                self.url,
                root(error)
            )
        } else {
            format!(
                "sink `{}`: POST to {} failed: {}",
                self.sink,
                self.url,
                // reqwest's own message only repeats the URL.
                error.source().map_or_else(|| error.to_string(), chain)
            )
        }
    }
}

/// `400 Bad Request`, or just the code when it has no standard reason.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The innermost cause of an error (`Connection refused (os error 111)`).
fn root(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// An error and its causes, `: `-separated.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// Reads a success answer's body, up to [`DRAIN_BYTES`]. The events are taken whatever
/// happens here.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while read < DRAIN_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => return,
        }
    }
}

/// The first [`EXCERPT_BYTES`] of an answer's body, as text, trimmed; `…` marks a cut.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    let mut unreadable = None;
    while bytes.len() <= EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                unreadable = Some(root(&e));
                break;
            }
        }
    }
    let cut = bytes.len() > EXCERPT_BYTES;
    let mut end = bytes.len().min(EXCERPT_BYTES);
    // Cut at a character boundary: step back over UTF-8 continuation bytes.
    while cut && end > 0 && bytes[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let mut text = String::from_utf8_lossy(&bytes[..end]).trim().to_owned();
    if cut {
        text.push('…');
    }
    if let Some(error) = unreadable {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&format!(
            "(the rest of the body could not be read: {error})"
        ));
    }
    text
}

impl Destination for HttpDestination {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async move {
            let mut body: Vec<u8> = Vec::from(b"[" as &[u8]);
            for line in batch.iter().flat_map(Outgoing::json_lines) {
                // Whole-batch slices hold many lines: the newlines between them become commas.
                for one in line.split_inclusive(|&b| b == b'\n') {
                    if body.len() > 1 {
                        body.push(b',');
                    }
                    body.extend_from_slice(one.strip_suffix(b"\n").unwrap_or(one));
                }
            }
            if body.len() == 1 {
                return Ok(());
            }
            body.push(b']');
            self.post(body).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::{Receiver, ReceiverOptions};
    use crate::sinks::{Selection, SharedBatch};
    use std::net::SocketAddr;
    use weir_format::{BatchBuilder, Event};

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn config(url: &str) -> HttpConfig {
        HttpConfig {
            url: url.to_owned(),
            headers: vec![("x-tenant".into(), "acme".into())],
            timeout: Duration::from_millis(200),
        }
    }

    fn events() -> Vec<Outgoing> {
        let mut b = BatchBuilder::new();
        b.push(&Event::new(br#"{"path":"/"}"#.to_vec(), 1000).with_key("user-7"));
        b.push(&Event::new(b"plain".to_vec(), 1001).with_header("h", b"v".to_vec()));
        b.push(&Event::new(vec![0xff, 0x00], 1002).with_route("eu"));
        b.push(&Event::new(b"7".to_vec(), 1003));
        let first = SharedBatch::verify(b.finish()).expect("built batches verify");
        let mut b = BatchBuilder::new();
        b.push(&Event::new(b"[1,2]".to_vec(), 2000));
        let second = SharedBatch::verify(b.finish()).expect("built batches verify");
        vec![
            Outgoing::new(first, Selection::Some(vec![0, 1, 2].into()), "p".into()),
            Outgoing::all(second, "p".into()),
        ]
    }

    /// A receiver that keeps what it takes.
    async fn receiver() -> Receiver {
        let options = ReceiverOptions {
            keep: true,
            ..ReceiverOptions::default()
        };
        Receiver::start(local(), options).await.expect("starts")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn posts_the_selected_events_as_one_json_array() {
        let receiver = receiver().await;
        let mut sink = HttpDestination::open("audit", &config(&receiver.url())).expect("opens");
        assert_eq!(sink.describe(), receiver.url());
        sink.send(&events()).await.expect("delivered");
        assert_eq!((receiver.requests(), receiver.events()), (1, 4));
        assert_eq!(
            receiver.received(),
            vec![
                serde_json::json!({"key":"user-7","value":{"path":"/"},"timestamp_ms":1000}),
                serde_json::json!({"value_text":"plain","timestamp_ms":1001,"headers":{"h":"v"}}),
                serde_json::json!({"value_b64":"/wA=","timestamp_ms":1002,"route":"eu"}),
                serde_json::json!({"value":[1,2],"timestamp_ms":2000}),
            ]
        );
        sink.send(&[]).await.expect("nothing to send");
        assert_eq!(receiver.requests(), 1);
        receiver.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_content_type_and_the_configured_headers() {
        // A raw server, to see the request as it arrives.
        let listener = tokio::net::TcpListener::bind(local()).await.expect("binds");
        let url = format!("http://{}/in", listener.local_addr().expect("an address"));
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.expect("a connection");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"]") {
                let n = stream.read(&mut buf).await.expect("reads");
                assert_ne!(n, 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("answers");
            String::from_utf8(request).expect("a text request")
        });
        let mut sink = HttpDestination::open("audit", &config(&url)).expect("opens");
        let mut b = BatchBuilder::new();
        b.push(&Event::new(b"1".to_vec(), 5));
        let batch = SharedBatch::verify(b.finish()).expect("verifies");
        sink.send(&[Outgoing::all(batch, "p".into())])
            .await
            .expect("delivered");
        let request = server.await.expect("the server ran");
        let (head, body) = request.split_once("\r\n\r\n").expect("a head and a body");
        let mut lines: Vec<&str> = head.lines().collect();
        let start = lines.remove(0);
        lines.sort_unstable();
        assert_eq!(start, "POST /in HTTP/1.1");
        let host = format!(
            "host: {}",
            url.trim_start_matches("http://").trim_end_matches("/in")
        );
        let content_length = format!("content-length: {}", body.len());
        let user_agent = concat!("user-agent: weir/", env!("CARGO_PKG_VERSION"));
        let mut expected = vec![
            "accept: */*",
            content_length.as_str(),
            "content-type: application/json",
            host.as_str(),
            user_agent,
            "x-tenant: acme",
        ];
        expected.sort_unstable();
        assert_eq!(lines, expected);
        assert_eq!(body, r#"[{"value":1,"timestamp_ms":5}]"#);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_error_is_retried_and_a_client_error_rejects() {
        let receiver = receiver().await;
        let url = receiver.url();
        let mut sink = HttpDestination::open("audit", &config(&url)).expect("opens");
        receiver.answer_with(StatusCode::SERVICE_UNAVAILABLE, "try later\n");
        assert_eq!(
            sink.send(&events()).await,
            Err(SendError::Retry(format!(
                "sink `audit`: {url} answered 503 Service Unavailable: try later"
            )))
        );
        receiver.answer_with(StatusCode::TOO_MANY_REQUESTS, "");
        assert_eq!(
            sink.send(&events()).await,
            Err(SendError::Retry(format!(
                "sink `audit`: {url} answered 429 Too Many Requests"
            )))
        );
        receiver.answer_with(StatusCode::BAD_REQUEST, "field `x` is required");
        assert_eq!(
            sink.send(&events()).await,
            Err(SendError::Reject(format!(
                "sink `audit`: {url} answered 400 Bad Request: field `x` is required"
            )))
        );
        // 201 bytes fit no whole `é` at bytes 199..201: the excerpt stops before it.
        receiver.answer_with(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("x{}", "é".repeat(150)),
        );
        assert_eq!(
            sink.send(&events()).await,
            Err(SendError::Reject(format!(
                "sink `audit`: {url} answered 422 Unprocessable Entity: x{}…",
                "é".repeat(99)
            )))
        );
        receiver.answer_normally();
        sink.send(&events()).await.expect("delivered");
        assert_eq!((receiver.requests(), receiver.events()), (5, 4));
        receiver.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redirect_is_not_followed() {
        let listener = tokio::net::TcpListener::bind(local()).await.expect("binds");
        let url = format!(
            "http://{}/ingest",
            listener.local_addr().expect("an address")
        );
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.expect("a connection");
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 301 Moved Permanently\r\nlocation: https://example.com/in\r\n\
                      content-length: 0\r\n\r\n",
                )
                .await;
        });
        let mut sink = HttpDestination::open("audit", &config(&url)).expect("opens");
        assert_eq!(
            sink.send(&events()).await,
            Err(SendError::Retry(format!(
                "sink `audit`: {url} answered 301 Moved Permanently (to https://example.com/in; \
                 redirects are not followed: set `url` to where it points)"
            )))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_receiver_is_retried_and_a_restarted_one_takes_events_again() {
        let receiver = receiver().await;
        let addr = receiver.local_addr();
        let url = receiver.url();
        receiver.stop().await;
        let mut fresh = HttpDestination::open("audit", &config(&url)).expect("opens");
        assert_eq!(
            fresh.send(&events()).await,
            Err(SendError::Retry(format!(
                "sink `audit`: cannot connect to {url}: Connection refused (os error 111)"
            )))
        );

        // Mid-stream: a pooled connection is closed under the sink.
        let receiver = Receiver::start(addr, ReceiverOptions::default())
            .await
            .expect("restarts on the same port");
        let mut sink = HttpDestination::open("audit", &config(&url)).expect("opens");
        sink.send(&events()).await.expect("delivered");
        receiver.stop().await;
        let error = sink
            .send(&events())
            .await
            .expect_err("the receiver is gone");
        let SendError::Retry(message) = error else {
            panic!("a stopped receiver is retried, got {error:?}");
        };
        assert!(
            message.starts_with(&format!("sink `audit`: cannot connect to {url}: "))
                || message.starts_with(&format!("sink `audit`: POST to {url} failed: ")),
            "{message}"
        );
        let receiver = Receiver::start(addr, ReceiverOptions::default())
            .await
            .expect("restarts on the same port again");
        sink.send(&events())
            .await
            .expect("delivered after the restart");
        assert_eq!((receiver.requests(), receiver.events()), (1, 4));
        receiver.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_never_answers_is_retried_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind(local()).await.expect("binds");
        let url = format!(
            "http://{}/ingest",
            listener.local_addr().expect("an address")
        );
        let (done, mut finished) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("a connection");
            // Hold the connection open, answering nothing, until the test is over.
            let _ = (&mut finished).await;
            drop(stream);
        });
        let mut sink = HttpDestination::open("audit", &config(&url)).expect("opens");
        assert_eq!(
            sink.send(&events()).await,
            Err(SendError::Retry(format!(
                "sink `audit`: {url} did not answer within 200ms"
            )))
        );
        let _ = done.send(());
        server.await.expect("the server ran");
    }

    #[test]
    fn a_bad_url_or_header_is_refused_at_open() {
        let open = |url: &str, header: (&str, &str)| {
            let config = HttpConfig {
                url: url.to_owned(),
                headers: vec![(header.0.to_owned(), header.1.to_owned())],
                timeout: Duration::from_secs(1),
            };
            HttpDestination::open("audit", &config)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            open("localhost:8080/in", ("a", "b")),
            Err(
                "sink `audit`: cannot open http localhost:8080/in: the URL's scheme is \
                 `localhost`, expected `http` or `https`"
                    .to_owned()
            )
        );
        assert_eq!(
            open("http://", ("a", "b")),
            Err("sink `audit`: cannot open http http://: invalid URL: empty host".to_owned())
        );
        assert_eq!(
            open("http://h/in", ("bad name", "b")),
            Err(
                "sink `audit`: cannot open http http://h/in: `bad name` is not a valid header \
                 name"
                    .to_owned()
            )
        );
        assert_eq!(
            open("http://h/in", ("x", "line\nbreak")),
            Err(
                "sink `audit`: cannot open http http://h/in: the value of header `x` is not \
                 valid"
                    .to_owned()
            )
        );
        assert_eq!(open("https://h/in", ("x", "y")), Ok(()));
    }
}
