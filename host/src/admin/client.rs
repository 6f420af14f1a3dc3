//! The admin endpoint's client: what `weir deploy`, `weir plugins` and `weir rollback` use.

use super::status::StatusView;
use super::{DeployReport, ErrorView, PluginsView, ReloadReport};
use reqwest::{StatusCode, Url};
use std::time::Duration;

/// How long a request may take beyond the time the router is asked to wait.
const SLACK: Duration = Duration::from_secs(60);

/// Why a request to the admin endpoint did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing answered at the address.
    #[error(
        "cannot reach the admin endpoint at {addr}: {message} (is the router running with an `[admin]` section listening there?)"
    )]
    Unreachable {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// The router answered with an error.
    #[error("{message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The router's message.
        message: String,
    },
    /// The answer was not what an admin endpoint sends.
    #[error(
        "the admin endpoint at {addr} answered {status} with something that is not weir's: {message}"
    )]
    Protocol {
        /// The address.
        addr: String,
        /// The HTTP status.
        status: u16,
        /// What was wrong.
        message: String,
    },
}

/// What to deploy where.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The pipeline.
    pub pipeline: String,
    /// The stage.
    pub stage: String,
    /// The plugin's name (its file stem).
    pub name: String,
    /// The component's bytes.
    pub component: Vec<u8>,
    /// Batches on probation (`None`: the router's default).
    pub probation: Option<u64>,
    /// Let the previous version finish its windows if the state layout changed.
    pub drain: bool,
    /// How long the router waits for the probation's verdict.
    pub wait: Duration,
}

/// A client of one router's admin endpoint.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: Url,
    addr: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client of the endpoint at `addr` (`HOST:PORT`, or an `http://` URL) using `token`.
    pub fn new(addr: &str, token: &str) -> Result<AdminClient, String> {
        let text = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let base = Url::parse(&text)
            .map_err(|e| format!("admin address `{addr}` is not HOST:PORT or a URL: {e}"))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(format!(
                "admin address `{addr}`: only http:// and https:// are spoken"
            ));
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(AdminClient {
            base,
            addr: addr.to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    /// The address it was given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.set_path(path);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends `request` with the token; an answer other than `200` becomes the error it names.
    async fn execute(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, AdminError> {
        let unreachable = |e: reqwest::Error| AdminError::Unreachable {
            addr: self.addr.clone(),
            message: reason(&e),
        };
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(response);
        }
        let body = response.bytes().await.map_err(unreachable)?;
        match serde_json::from_slice::<ErrorView>(&body) {
            Ok(view) => Err(AdminError::Refused {
                status: status.as_u16(),
                message: view.error,
            }),
            Err(_) => Err(AdminError::Protocol {
                addr: self.addr.clone(),
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).trim().to_owned(),
            }),
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, AdminError> {
        let response = self.execute(request).await?;
        let body = response
            .bytes()
            .await
            .map_err(|e| AdminError::Unreachable {
                addr: self.addr.clone(),
                message: reason(&e),
            })?;
        serde_json::from_slice(&body).map_err(|e| AdminError::Protocol {
            addr: self.addr.clone(),
            status: StatusCode::OK.as_u16(),
            message: e.to_string(),
        })
    }

    /// Deploys a component (see `admin::deploy`).
    pub async fn deploy(&self, request: DeployRequest) -> Result<DeployReport, AdminError> {
        let mut query = vec![
            ("pipeline", request.pipeline),
            ("stage", request.stage),
            ("name", request.name),
            ("wait_ms", request.wait.as_millis().to_string()),
        ];
        if let Some(probation) = request.probation {
            query.push(("probation", probation.to_string()));
        }
        if request.drain {
            query.push(("state", "drain".to_owned()));
        }
        let request = self
            .http
            .post(self.url("/v1/deploy", &query))
            .timeout(request.wait + SLACK)
            .body(request.component);
        self.send(request).await
    }

    /// Rolls `pipeline/stage` back to `version`, or to the version before.
    pub async fn rollback(
        &self,
        pipeline: &str,
        stage: &str,
        version: Option<&str>,
    ) -> Result<DeployReport, AdminError> {
        let mut query = vec![
            ("pipeline", pipeline.to_owned()),
            ("stage", stage.to_owned()),
        ];
        if let Some(version) = version {
            query.push(("version", version.to_owned()));
        }
        let request = self
            .http
            .post(self.url("/v1/rollback", &query))
            .timeout(SLACK);
        self.send(request).await
    }

    /// Has the router read its config file again and apply what changed.
    pub async fn reload(&self) -> Result<ReloadReport, AdminError> {
        let request = self
            .http
            .post(self.url("/v1/reload", &[]))
            .timeout(crate::topology::DRAIN + SLACK);
        self.send(request).await
    }

    /// Every stage's versions.
    pub async fn plugins(&self) -> Result<PluginsView, AdminError> {
        let request = self.http.get(self.url("/v1/plugins", &[])).timeout(SLACK);
        self.send(request).await
    }

    /// Every pipeline, stage and sink with its counters (what `weir top` shows).
    pub async fn status(&self, timeout: Duration) -> Result<StatusView, AdminError> {
        let request = self.http.get(self.url("/v1/status", &[])).timeout(timeout);
        self.send(request).await
    }

    /// Opens a tap on `pipeline` (or its stage `stage`), every `sample`th event.
    pub async fn tap(
        &self,
        pipeline: &str,
        stage: Option<&str>,
        sample: u64,
    ) -> Result<TapStream, AdminError> {
        let mut query = vec![
            ("pipeline", pipeline.to_owned()),
            ("sample", sample.to_string()),
        ];
        if let Some(stage) = stage {
            query.push(("stage", stage.to_owned()));
        }
        let response = self
            .execute(self.http.get(self.url("/v1/tap", &query)))
            .await?;
        Ok(TapStream {
            response,
            addr: self.addr.clone(),
        })
    }
}

/// An open tap: JSON lines as the router sends them.
#[derive(Debug)]
pub struct TapStream {
    response: reqwest::Response,
    addr: String,
}

impl TapStream {
    /// The next bytes of the stream (a line may end in the next piece); `None` once the
    /// router ended it (it stopped).
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, AdminError> {
        self.response
            .chunk()
            .await
            .map_err(|e| AdminError::Unreachable {
                addr: self.addr.clone(),
                message: reason(&e),
            })
    }
}

/// The innermost cause of a reqwest error, which says what happened ("Connection refused").
fn reason(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}
