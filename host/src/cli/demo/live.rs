//! The live view of `weir demo`: a progress bar over the events taken in and the counts table,
//! on stderr, redrawn five times a second while the workload streams.
//!
//! indicatif draws it, and hides it when stderr is not a terminal (or `TERM` is `dumb`): then
//! nothing is drawn and the output holds no escape codes.
//!
//! Meanwhile the console sink writes window results to stdout. When stdout is the terminal
//! too, a line written there while the view is on screen would land inside the view, and the
//! next redraw, which clears the lines the view took, would erase it. So the view is on screen
//! only while it holds stdout's lock, which the stdout sink takes for each write: when that
//! sink has lines waiting, the view clears itself, lets go of the lock until they are written,
//! then takes it again and redraws below them.

use super::counts::Table;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use weir::server::Server;

/// How often the view is redrawn.
const REDRAW: Duration = Duration::from_millis(200);
/// How often it looks for lines waiting for stdout: about the longest a window result (and
/// so the round of `totals` that produced it) waits for the view.
const POLL: Duration = Duration::from_millis(2);
/// The longest the view stays off screen for one write to stdout (a sink that cannot write
/// retries with backoff: the view does not wait for that).
const LET_THROUGH: Duration = Duration::from_millis(100);

/// Runs `work` while the view shows `server`'s counts, `total` being the events expected in;
/// the view is cleared before this returns.
pub(super) fn show_while<R>(
    server: &Server,
    table: &Table,
    total: u64,
    work: impl FnOnce() -> R,
) -> R {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if bar.is_hidden() {
        return work();
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed:>3} [{bar:40}] {pos}/{len} events in, {prefix}\n{msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    let (stop, stopped) = mpsc::channel::<()>();
    let bar = &bar;
    std::thread::scope(|scope| {
        scope.spawn(move || refresh(bar, server, table, stopped));
        let result = work();
        drop(stop);
        result
    })
}

/// Redraws until `stopped` disconnects, then clears the view.
fn refresh(bar: &ProgressBar, server: &Server, table: &Table, stopped: mpsc::Receiver<()>) {
    let stdout = std::io::stdout();
    let mut held = stdout.is_terminal().then(|| stdout.lock());
    let started = Instant::now();
    let mut redraw = started;
    loop {
        if Instant::now() >= redraw {
            let stats = server.stats();
            let rate = stats.events_accepted as f64 / started.elapsed().as_secs_f64().max(1e-3);
            bar.set_position(stats.events_accepted);
            bar.set_prefix(format!("{rate:.0} events/s"));
            bar.set_message(table.render(&stats));
            redraw = Instant::now() + REDRAW;
        }
        if held.is_some() && table.stdout_pending() {
            let guard = held.take();
            held = bar.suspend(|| {
                drop(guard);
                let until = Instant::now() + LET_THROUGH;
                while table.stdout_pending() && Instant::now() < until {
                    std::thread::sleep(POLL);
                }
                Some(stdout.lock())
            });
        }
        if stopped.recv_timeout(POLL) != Err(mpsc::RecvTimeoutError::Timeout) {
            break;
        }
    }
    bar.finish_and_clear();
}
