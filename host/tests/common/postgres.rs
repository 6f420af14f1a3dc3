//! A PostgreSQL server of a test's own: a fresh cluster in a temporary directory, listening on
//! 127.0.0.1 on a free port (and a Unix socket in the same directory), stopped and deleted when
//! dropped.
//!
//! It runs the installed PostgreSQL: `initdb`, `pg_ctl` and `psql` from the newest
//! `/usr/lib/postgresql/*/bin` (Debian's layout) or else from `PATH`. `.ci/run` installs the
//! `postgresql` package; without it [`PgServer::start`] fails, naming `.ci/run`, rather than
//! letting a test pass untested. `initdb` and `postgres` refuse to run as root: as root, they run
//! as the `postgres` user (which the Debian package creates) through `runuser`, and the
//! temporary directory is handed to that user.
//!
//! The cluster trusts local connections: user [`USER`], database [`DATABASE`]. It runs with
//! `fsync`, `synchronous_commit` and `full_page_writes` off: tests never survive a power loss.

// Each test binary that includes this file uses a part of it.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The superuser the cluster is created with.
pub const USER: &str = "weir";
/// The database [`PgServer::start`] creates.
pub const DATABASE: &str = "weir";

/// Where Debian installs each PostgreSQL version (`<dir>/<version>/bin`).
const DEBIAN_LIB: &str = "/usr/lib/postgresql";
/// How many free ports are tried when another process takes the chosen one first.
const PORT_ATTEMPTS: usize = 5;
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_WAIT_SECONDS: &str = "60";

/// A running PostgreSQL server; see the module documentation.
pub struct PgServer {
    bin: PathBuf,
    /// Holds the cluster (`data/`), the socket directory (`socket/`) and the server's log.
    dir: tempfile::TempDir,
    port: u16,
    /// Whether the server's programs run as the `postgres` user (the tests run as root).
    as_postgres: bool,
}

impl PgServer {
    /// Creates a cluster, starts it on a free port, waits until it accepts connections and
    /// creates database [`DATABASE`]. Panics, saying why, when any of it fails.
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let as_postgres = output(Command::new("id").arg("-u"), "id -u").trim() == "0";
        let dir = tempfile::Builder::new()
            .prefix("weir-pg-")
            .tempdir()
            .expect("a temporary directory for the PostgreSQL cluster");
        fs::create_dir(dir.path().join("socket")).expect("the socket directory");
        if as_postgres {
            hand_to_postgres_user(dir.path());
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            as_postgres,
        };
        let mut initdb = server.command("initdb");
        initdb
            .arg("--pgdata")
            .arg(server.data())
            .args(["--username", USER, "--auth", "trust"])
            .args(["--encoding", "UTF8", "--locale", "C", "--no-sync"]);
        output(&mut initdb, "initdb");
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            server.configure();
            match server.try_start() {
                Ok(()) => {
                    server.psql_in("postgres", &format!("CREATE DATABASE {DATABASE}"));
                    return server;
                }
                Err(error) => last_error = error,
            }
        }
        panic!("PostgreSQL did not start in {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// A connection string for [`USER`] on [`DATABASE`] over TCP
    /// (`host=127.0.0.1 port=<port> user=weir dbname=weir`).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname={DATABASE}",
            self.port
        )
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` in [`DATABASE`] with `psql` and returns what it printed: one line per row,
    /// the columns separated by `|`, no header, NULL as the empty string. Panics, with the
    /// server's message, when a statement fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(DATABASE, sql)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: connections are cut, nothing is
    /// flushed); [`PgServer::restart`] starts it again on the same port with the same data.
    pub fn stop(&self) {
        let mut stop = self.pg_ctl("stop");
        stop.args(["-m", "immediate"]);
        output(&mut stop, "pg_ctl stop");
    }

    /// Starts the server again after [`PgServer::stop`] and waits until it accepts connections.
    pub fn restart(&self) {
        if let Err(error) = self.try_start() {
            panic!("PostgreSQL did not start again: {error}");
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command running one of the server's programs, as the `postgres` user when root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(path);
            runuser
        } else {
            Command::new(path)
        };
        // The `postgres` user may not be allowed into the test's directory.
        command.current_dir(self.dir.path());
        command
    }

    fn pg_ctl(&self, action: &str) -> Command {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.arg(action).arg("--pgdata").arg(self.data()).args([
            "--wait",
            "--timeout",
            PG_CTL_WAIT_SECONDS,
        ]);
        pg_ctl
    }

    /// Appends the listening address, the port, the socket directory and the speed settings
    /// to `postgresql.conf` (a later line wins over an earlier one).
    fn configure(&self) {
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\n",
            self.port,
            self.dir.path().join("socket").display()
        );
        let conf = self.data().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("initdb writes postgresql.conf");
        text.push_str(&settings);
        fs::write(&conf, text).expect("postgresql.conf is writable");
    }

    /// `pg_ctl start`, waiting until the server accepts connections; the error holds the
    /// server's log.
    fn try_start(&self) -> Result<(), String> {
        let mut start = self.pg_ctl("start");
        start.arg("--log").arg(self.log());
        let result = start.output().expect("pg_ctl runs");
        if result.status.success() {
            return Ok(());
        }
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        Err(format!(
            "pg_ctl start failed ({}): {}\nserver log:\n{log}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ))
    }

    fn psql_in(&self, database: &str, sql: &str) -> String {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", USER, "-d", database, "-c", sql]);
        let out = output(&mut psql, &format!("psql -c {sql:?}"));
        out.strip_suffix('\n').unwrap_or(&out).to_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut stop = self.pg_ctl("stop");
        stop.args(["-m", "immediate"]);
        let _ = stop.output();
        // pg_ctl removes postmaster.pid once the server is gone: if it is still there, kill
        // the postmaster (its first line).
        let pid_file = self.data().join("postmaster.pid");
        if let Ok(text) = fs::read_to_string(pid_file)
            && let Some(pid) = text.lines().next()
        {
            let _ = Command::new("kill").args(["-KILL", pid]).output();
        }
    }
}

/// The directory holding `initdb`, `pg_ctl`, `postgres` and `psql`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(DEBIAN_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("initdb"))
        .find(|initdb| initdb.is_file());
    // A link on PATH (/usr/local/bin/initdb) points at the directory that has the rest.
    if let Some(dir) = on_path
        .and_then(|initdb| fs::canonicalize(initdb).ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
    {
        return dir;
    }
    panic!(
        "PostgreSQL is not installed (no `initdb` under {DEBIAN_LIB}/*/bin or on PATH): the \
         postgres tests start their own server; install it as .ci/run does \
         (`apt-get install -y postgresql`)"
    );
}

/// Gives `dir` to the `postgres` user, for `initdb` and the server run as that user.
fn hand_to_postgres_user(dir: &Path) {
    let id = |flag: &str| -> u32 {
        let mut id = Command::new("id");
        id.args([flag, "postgres"]);
        let result = id.output().expect("id runs");
        assert!(
            result.status.success(),
            "the tests run as root, where initdb and postgres refuse to run, and there is no \
             `postgres` user to run them as (the Debian package creates it; see .ci/run): {}",
            String::from_utf8_lossy(&result.stderr)
        );
        String::from_utf8_lossy(&result.stdout)
            .trim()
            .parse()
            .expect("id prints a number")
    };
    let (uid, gid) = (id("-u"), id("-g"));
    for path in [dir.to_path_buf(), dir.join("socket")] {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("cannot give {} to postgres: {e}", path.display()));
    }
}

/// A port that is free now (the listener is closed again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// Runs `command`; its standard output, or a panic with its standard error.
fn output(command: &mut Command, what: &str) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        status.success(),
        "{what} failed ({status}): {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8_lossy(&stdout).into_owned()
}
