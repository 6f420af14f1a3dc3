//! The demo's hot load: halfway through the stream it deploys geo-enrich's next version
//! (geo-enrich-v2, which adds a `region` header) into stage `clicks/geo-enrich` of the running
//! router through its admin endpoint, exactly as `weir deploy` does; after the stream it reads
//! the probation's verdict and counts the archive's events by the geo-enrich version that
//! enriched them (the pipeline's `weir-versions` header).
//!
//! The producer waits for the first half's acks, then for the swap (not for the probation),
//! before it sends the second half, so that the split of events between the two versions is
//! the same on every run: the first half by the old version, the second by the new.

use super::setup::Files;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use weir::admin::client::{AdminClient, DeployRequest};
use weir::admin::registry::Status;
use weir::admin::{DeployReport, StageView};

/// The stage the demo deploys to.
const STAGE: &str = "clicks/geo-enrich";
/// Batches the new version takes on probation.
const PROBATION: u64 = 3;
/// How long the demo waits for the probation's verdict after the stream.
const VERDICT_WAIT: Duration = Duration::from_secs(10);

/// The demo's deploy: where the router's admin endpoint is, and what it deploys.
pub(super) struct Midway {
    admin: AdminClient,
    addr: SocketAddr,
    token: String,
    component: std::path::PathBuf,
}

/// How the deploy went, for the summary.
pub(super) struct Deployed {
    report: DeployReport,
    /// The stage once the stream was acked (the probation's verdict).
    stage: Option<StageView>,
}

impl Midway {
    pub fn new(addr: SocketAddr, token: &str, files: &Files) -> Result<Midway> {
        Ok(Midway {
            admin: AdminClient::new(&addr.to_string(), token).map_err(anyhow::Error::msg)?,
            addr,
            token: token.to_owned(),
            component: files.geo_v2.clone(),
        })
    }

    /// The banner's lines: what the demo will run, and what to try while it streams.
    pub fn banner(&self) -> String {
        format!(
            "hot load: halfway through, the demo deploys geo-enrich's next version (it adds a \
             `region` header) into the running router, as you would with:\n  weir deploy {STAGE} \
             {} --admin {} --token {}\nwhile it streams, `weir plugins` (same --admin and \
             --token) lists the versions\n",
            self.component.display(),
            self.addr,
            self.token
        )
    }

    /// Deploys geo-enrich-v2; returns once it is swapped in (its probation goes on).
    pub async fn deploy(&self) -> Result<DeployReport> {
        let component = std::fs::read(&self.component)
            .with_context(|| format!("cannot read {}", self.component.display()))?;
        let (pipeline, stage) = STAGE.split_once('/').unwrap_or_default();
        let request = DeployRequest {
            pipeline: pipeline.to_owned(),
            stage: stage.to_owned(),
            name: "geo_enrich_v2".to_owned(),
            component,
            probation: Some(PROBATION),
            drain: false,
            wait: Duration::ZERO,
        };
        Ok(self.admin.deploy(request).await?)
    }

    /// Waits (bounded) for the deployed version's probation to end; the stage as then.
    pub async fn verdict(&self, report: DeployReport) -> Deployed {
        let mut stage = None;
        let deadline = tokio::time::Instant::now() + VERDICT_WAIT;
        while tokio::time::Instant::now() < deadline {
            let Ok(view) = self.admin.plugins().await else {
                break;
            };
            stage = view
                .stages
                .into_iter()
                .find(|s| format!("{}/{}", s.pipeline, s.stage) == STAGE);
            let judged = stage.as_ref().is_some_and(|s| {
                s.versions
                    .iter()
                    .any(|v| v.version == report.version && v.status != Status::Probation)
            });
            if judged {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Deployed { report, stage }
    }
}

/// The summary's lines about the deploy, and the archive's events by geo-enrich version.
pub(super) fn summary(deployed: &Result<Deployed, String>, files: &Files) -> Result<String> {
    let mut text = String::new();
    let deployed = match deployed {
        Ok(deployed) => deployed,
        Err(e) => {
            writeln!(text, "hot load: the demo's deploy to {STAGE} failed: {e}")?;
            return Ok(text);
        }
    };
    let r = &deployed.report;
    let status = deployed
        .stage
        .as_ref()
        .and_then(|s| s.versions.iter().find(|v| v.version == r.version));
    let verdict = match status {
        Some(v) if v.status == Status::Serving => {
            format!("passed its probation ({PROBATION} batches) and serves")
        }
        Some(v) if v.status == Status::RolledBack => format!(
            "was rolled back on probation: {}",
            v.error.as_deref().unwrap_or("no reason given")
        ),
        Some(v) => format!("is {}", v.status.as_str()),
        None => "has no verdict yet".to_owned(),
    };
    writeln!(
        text,
        "hot load: geo-enrich {} deployed to {STAGE} halfway (was {}): {} in {:.0} ms, \
         swapped in {:.0} ms after the request, batches waited {:.3} ms; it {verdict}",
        r.version,
        r.previous,
        if r.from_cache {
            "loaded from the compile cache"
        } else {
            "compiled"
        },
        r.compile_ms,
        r.serving_ms,
        r.pause_us / 1e3
    )?;
    let versions = archive_versions(&files.archive)?;
    let total: u64 = versions.values().sum();
    let by: Vec<String> = versions
        .iter()
        .map(|(version, n)| format!("{version} {n}"))
        .collect();
    writeln!(
        text,
        "  archive events by the geo-enrich version that enriched them (header weir-versions): {} ({total} in all)",
        by.join(", ")
    )?;
    if status.is_some_and(|v| v.status == Status::Serving) {
        writeln!(
            text,
            "  `weir serve` on this config now starts with {} (the version last deployed); `weir rollback {STAGE}` there puts {} back",
            r.version, r.previous
        )?;
    }
    Ok(text)
}

/// The archive's events counted by geo-enrich version, from their `weir-versions` header.
fn archive_versions(archive: &std::path::Path) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(archive)
        .with_context(|| format!("cannot read {}", archive.display()))?;
    let mut versions = BTreeMap::new();
    for line in text.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: a line is not JSON", archive.display()))?;
        let header = event["headers"]["weir-versions"]
            .as_str()
            .unwrap_or_default();
        let version = header
            .split(',')
            .find_map(|pair| pair.strip_prefix("geo-enrich="))
            .unwrap_or("none")
            .to_owned();
        *versions.entry(version).or_insert(0) += 1;
    }
    Ok(versions)
}
