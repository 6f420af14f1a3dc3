//! `weir top`: a running router's pipelines, stages and sinks, refreshed live in the terminal
//! from its admin endpoint (`GET /v1/status`): events/s in and out, totals, buffer fill, dead
//! letters, the plugin version each stage runs and when it was deployed, the last reload.
//!
//! Rates are the difference of two answers over the time between them, so the first screen
//! shows totals only. `q`, Esc or Ctrl-C quits and gives the terminal back as it was. A router
//! that cannot be reached at the start is an error; one that goes away later is said on the
//! screen (with when it last answered) while `weir top` keeps asking. With `--once`, or when
//! stdout is not a terminal, it prints one screen of totals and exits.

use super::AdminArgs;
use anyhow::{Context, Result};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, style, terminal};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::mpsc;
use std::time::Duration;
use weir::admin::client::AdminClient;
use weir::admin::status::StatusView;
use weir::utc::Utc;

/// Arguments of `weir top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Milliseconds between two refreshes.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    every: u64,
    /// Print one screen of totals and exit (also what happens when stdout is not a terminal).
    #[arg(long)]
    once: bool,
}

/// How long one status request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often keys are looked for while waiting for the next answer.
const KEYS: Duration = Duration::from_millis(50);

/// Runs the command.
pub fn run(args: &TopArgs) -> Result<()> {
    let client = args.admin.client()?;
    let runtime = super::admin_runtime()?;
    let first = runtime.block_on(client.status(REQUEST_TIMEOUT))?;
    if args.once || !std::io::stdout().is_terminal() {
        print!(
            "{}",
            render(&Screen::new(client.addr(), first), usize::MAX).join("\n")
        );
        println!();
        return Ok(());
    }
    let every = Duration::from_millis(args.every.max(100));
    let (tx, answers) = mpsc::channel();
    let polling = client.clone();
    std::thread::Builder::new()
        .name("weir-top-poll".into())
        .spawn(move || runtime.block_on(poll(polling, every, tx)))
        .context("cannot start a thread")?;
    let mut screen = Screen::new(client.addr(), first);
    let _terminal = Terminal::take()?;
    draw(&screen)?;
    loop {
        if event::poll(KEYS).context("reading the keyboard")? {
            match event::read().context("reading the keyboard")? {
                Event::Key(key) if key.kind != KeyEventKind::Release && quits(key) => break,
                Event::Resize(..) => draw(&screen)?,
                _ => {}
            }
        }
        let mut changed = false;
        while let Ok(answer) = answers.try_recv() {
            screen.update(answer);
            changed = true;
        }
        if changed {
            draw(&screen)?;
        }
    }
    Ok(())
}

fn quits(key: event::KeyEvent) -> bool {
    matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc)
        || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
}

/// Asks for the status every `every` until the screen goes away.
async fn poll(
    client: AdminClient,
    every: Duration,
    answers: mpsc::Sender<Result<StatusView, String>>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let answer = client
            .status(REQUEST_TIMEOUT)
            .await
            .map_err(|e| e.to_string());
        if answers.send(answer).is_err() {
            return;
        }
    }
}

/// The terminal in raw mode on the alternate screen, given back as it was when dropped.
struct Terminal;

impl Terminal {
    fn take() -> Result<Terminal> {
        terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        let terminal = Terminal;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .context("cannot switch to the alternate screen")?;
        Ok(terminal)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // Giving the terminal back is best effort: there is nobody to tell if it fails.
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

fn draw(screen: &Screen) -> Result<()> {
    let (width, height) = terminal::size().unwrap_or((120, 40));
    let mut out = std::io::stdout().lock();
    queue!(out, terminal::Clear(terminal::ClearType::All))?;
    for (row, line) in render(screen, usize::from(width))
        .iter()
        .take(usize::from(height))
        .enumerate()
    {
        queue!(
            out,
            cursor::MoveTo(0, u16::try_from(row).unwrap_or(u16::MAX)),
            style::Print(line)
        )?;
    }
    out.flush().context("drawing")?;
    Ok(())
}

/// What is on screen: the last answer, the one before (for rates), and whether the last
/// request failed.
struct Screen {
    addr: String,
    now: StatusView,
    before: Option<StatusView>,
    unreachable: Option<String>,
}

impl Screen {
    fn new(addr: &str, first: StatusView) -> Screen {
        Screen {
            addr: addr.to_owned(),
            now: first,
            before: None,
            unreachable: None,
        }
    }

    fn update(&mut self, answer: Result<StatusView, String>) {
        match answer {
            Ok(view) => {
                // A restarted router counts from zero: no rate across that.
                let restarted = view.started_ms != self.now.started_ms;
                let before = std::mem::replace(&mut self.now, view);
                self.before = (!restarted).then_some(before);
                self.unreachable = None;
            }
            Err(e) => {
                self.before = None;
                self.unreachable = Some(e);
            }
        }
    }

    /// Events per second from `before` to `now` of the counter `read` picks.
    fn rate(&self, read: impl Fn(&StatusView) -> Option<u64>) -> String {
        let Some(before) = &self.before else {
            return "-".to_owned();
        };
        let seconds = (self.now.now_ms - before.now_ms) as f64 / 1e3;
        match (read(&self.now), read(before)) {
            (Some(now), Some(then)) if seconds > 0.0 => {
                format!("{:.0}", now.saturating_sub(then) as f64 / seconds)
            }
            _ => "-".to_owned(),
        }
    }
}

fn when(ms: i64) -> String {
    Utc::of_millis(u64::try_from(ms).unwrap_or(0)).readable()
}

fn uptime(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60) {
        (0, 0, m, s) => format!("{m}m {s:02}s"),
        (0, h, m, _) => format!("{h}h {m:02}m"),
        (d, h, _, _) => format!("{d}d {h:02}h"),
    }
}

fn clip(mut line: String, width: usize) -> String {
    if line.chars().count() > width {
        line = line.chars().take(width).collect();
    }
    line
}

/// The screen's lines, each at most `width` characters.
fn render(screen: &Screen, width: usize) -> Vec<String> {
    let view = &screen.now;
    let mut lines = vec![format!(
        "weir top  {}  config {}  up {}  at {}  (q quits)",
        screen.addr,
        view.config,
        uptime(view.now_ms - view.started_ms),
        when(view.now_ms)
    )];
    lines.push(match &view.last_reload {
        None => "last reload: none since the start".to_owned(),
        Some(r) => format!(
            "last reload: {} {}: {}",
            when(r.at_ms),
            if r.applied { "applied" } else { "REFUSED" },
            r.summary
        ),
    });
    if let Some(e) = &screen.unreachable {
        lines.push(format!(
            "NOT REACHABLE: {e}; last answer at {}, retrying",
            when(view.now_ms)
        ));
    }
    lines.push(String::new());
    let name_width = view
        .pipelines
        .iter()
        .flat_map(|p| {
            p.stages
                .iter()
                .map(|s| s.name.len() + 2)
                .chain([p.name.len()])
        })
        .chain(view.sinks.iter().map(|s| s.name.len()))
        .chain(view.sources.iter().map(|s| s.name.len()))
        .chain([14])
        .max()
        .unwrap_or(14);
    let mut table = String::new();
    let mut row = |cells: [&str; 10]| {
        let [a, b, c, d, e, f, g, h, i, j] = cells;
        // Writing to a String cannot fail.
        let _ = writeln!(
            table,
            "{a:<name_width$} {b:>9} {c:>9} {d:>12} {e:>12} {f:>9} {g:>9}  {h:<9} {i:<8} {j}"
        );
    };
    row([
        "PIPELINE/STAGE",
        "IN/s",
        "OUT/s",
        "IN",
        "OUT",
        "DROPPED",
        "DEAD",
        "KIND",
        "VERSION",
        "DEPLOYED",
    ]);
    for (p, pipeline) in view.pipelines.iter().enumerate() {
        let c = &pipeline.counts;
        let dead = (c.dead_letters + c.late_events).to_string();
        row([
            &pipeline.name,
            &screen.rate(|v| v.pipelines.get(p).map(|p| p.counts.events_accepted)),
            &screen.rate(|v| v.pipelines.get(p).map(|p| p.counts.events_out)),
            &c.events_accepted.to_string(),
            &c.events_out.to_string(),
            "-",
            &dead,
            "pipeline",
            "",
            &format!(
                "acked {} batches; {} duplicate events dropped",
                c.batches_acked, c.duplicates_dropped
            ),
        ]);
        for (s, stage) in pipeline.stages.iter().enumerate() {
            let read = |out: bool| {
                move |v: &StatusView| {
                    let stage = v.pipelines.get(p)?.stages.get(s)?;
                    Some(if out {
                        stage.events_out
                    } else {
                        stage.events_in
                    })
                }
            };
            let dropped = if stage.kind == "aggregate" {
                "-".to_owned()
            } else {
                stage.dropped.to_string()
            };
            row([
                &format!("  {}", stage.name),
                &screen.rate(read(false)),
                &screen.rate(read(true)),
                &stage.events_in.to_string(),
                &stage.events_out.to_string(),
                &dropped,
                &stage.dead_lettered.to_string(),
                &stage.kind,
                &stage.version,
                &format!("{} {}", stage.plugin, when(stage.deployed_ms)),
            ]);
        }
    }
    lines.extend(table.lines().map(str::to_owned));
    lines.push(String::new());
    let mut table = String::new();
    let mut row = |cells: [&str; 8]| {
        let [a, b, c, d, e, f, g, h] = cells;
        // Writing to a String cannot fail.
        let _ = writeln!(
            table,
            "{a:<name_width$} {b:>9} {c:>12} {d:>18} {e:>9} {f:>9} {g:>7}  {h}"
        );
    };
    row([
        "SINK",
        "OUT/s",
        "DELIVERED",
        "BUFFERED (FILL)",
        "DROPPED",
        "DEAD",
        "ERRORS",
        "DESTINATION",
    ]);
    for (k, sink) in view.sinks.iter().enumerate() {
        let c = &sink.counts;
        let fill = if sink.capacity > 0 {
            format!(
                "{} ({:.0}%)",
                c.buffered,
                100.0 * c.buffered as f64 / sink.capacity as f64
            )
        } else {
            c.buffered.to_string()
        };
        row([
            &sink.name,
            &screen.rate(|v| v.sinks.get(k).map(|s| s.counts.events_out)),
            &c.events_out.to_string(),
            &fill,
            &c.dropped.to_string(),
            &c.dead_lettered.to_string(),
            &c.errors.to_string(),
            &format!("{} (when full: {})", sink.destination, sink.when_full),
        ]);
    }
    lines.extend(table.lines().map(str::to_owned));
    if !view.sources.is_empty() {
        lines.push(String::new());
        lines.extend(sources(screen, name_width));
    }
    lines.into_iter().map(|l| clip(l, width)).collect()
}

/// The Kafka sources: batches handed over, the partitions owned and their lag.
fn sources(screen: &Screen, name_width: usize) -> Vec<String> {
    let mut table = String::new();
    let mut row = |cells: [&str; 6]| {
        let [a, b, c, d, e, f] = cells;
        // Writing to a String cannot fail.
        let _ = writeln!(table, "{a:<name_width$} {b:>9} {c:>12} {d:>9} {e:<12} {f}");
    };
    row([
        "SOURCE",
        "BATCHES/s",
        "BATCHES",
        "LAG",
        "PIPELINE",
        "PARTITIONS / READS",
    ]);
    for (i, source) in screen.now.sources.iter().enumerate() {
        let lag: i64 = source.partitions.iter().map(|p| p.lag).sum();
        let mut owned: Vec<String> = Vec::new();
        for p in &source.partitions {
            match owned.last_mut() {
                Some(last) if last.starts_with(&format!("{}[", p.topic)) => {
                    last.pop();
                    last.push_str(&format!(",{}]", p.partition));
                }
                _ => owned.push(format!("{}[{}]", p.topic, p.partition)),
            }
        }
        let owned = if owned.is_empty() {
            "none".to_owned()
        } else {
            owned.join(" ")
        };
        row([
            &source.name,
            &screen.rate(|v| v.sources.get(i).map(|s| s.batches)),
            &source.batches.to_string(),
            &lag.to_string(),
            &source.pipeline,
            &format!("{owned} / {}", source.describe),
        ]);
    }
    table.lines().map(str::to_owned).collect()
}
