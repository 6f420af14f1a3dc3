//! The postgres destination: one row per event in a PostgreSQL table.
//!
//! # The table
//!
//! Without `columns`, the table has the default columns, the fields of an event's JSON line
//! (the file sink's lines, `weir_format::json`):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS events (
//!     key          text,              -- NULL when the event has no key
//!     value        jsonb NOT NULL,    -- the value when it is JSON, else the value's text as a JSON string
//!     timestamp_ms bigint NOT NULL,   -- milliseconds since the Unix epoch
//!     headers      jsonb NOT NULL,    -- {"name": "value", ...}; {} when none
//!     route        text               -- NULL when no route is set
//! )
//! ```
//!
//! With `create = true` (the default) the table is created like this when it does not exist.
//! A value that is UTF-8 text but not JSON (`plain text`) is stored as the JSON string
//! `"plain text"`, so the JSON string `"plain text"` and the text `plain text` land alike; a
//! value that is not UTF-8 cannot go into `jsonb` and is refused (map `value` to a `bytea`
//! column to keep binary values). `headers` is an object of name → text; when a name repeats or
//! a value is not UTF-8 it takes the JSON-lines form instead (an array of `[name, value]` pairs,
//! `{"b64": "..."}` for a binary value).
//!
//! `columns` maps column names to what of the event goes there:
//!
//! | source          | what                                                        | created as |
//! |-----------------|-------------------------------------------------------------|------------|
//! | `key`           | the key (NULL when none)                                    | `text`     |
//! | `value`         | the value                                                   | `jsonb`    |
//! | `value_text`    | the value as text                                           | `text`     |
//! | `timestamp_ms`  | the event time, milliseconds since the Unix epoch           | `bigint`   |
//! | `headers`       | every header, as above                                      | `jsonb`    |
//! | `route`         | the route tag (NULL when none)                              | `text`     |
//! | `value.FIELD`   | top-level field `FIELD` of a JSON object value (NULL when the value is not a JSON object or has no such field; `FIELD` is taken literally, dots included) | `jsonb` |
//! | `header.NAME`   | the first header named `NAME` (NULL when none)              | `text`     |
//!
//! With `create = true` a missing table is created with the columns of the mapping, of the types
//! in the last column (`value`, `value_text`, `timestamp_ms` and `headers` `NOT NULL`). An
//! existing table is used as it is: its columns may have other types, and each source goes in
//! according to the column's type (a domain counts as its base type, an enum as `text`):
//!
//! - `key`, `value`, `value_text`, `route`, `header.NAME` go to `text` (also `varchar`, `char`,
//!   `name`, `citext`; the bytes must be UTF-8), `bytea` (the bytes as they are) and
//!   `json`/`jsonb` (a JSON string; `value` goes in as itself when it is JSON).
//! - `timestamp_ms` goes to `bigint`, `double precision`, `text`, `json`/`jsonb` (a number) and
//!   `timestamptz`/`timestamp` (the instant, in UTC). For a `timestamptz` column beside the
//!   number, a generated column does it: `ts timestamptz GENERATED ALWAYS AS
//!   (to_timestamp(timestamp_ms / 1000.0)) STORED`.
//! - `headers` goes to `json`/`jsonb` and `text` (the JSON text).
//! - `value.FIELD` goes to `json`/`jsonb` (the field's JSON), `text` (a string field's text,
//!   any other field's JSON text), `smallint`/`integer`/`bigint` (a JSON integer that fits),
//!   `real`/`double precision` (a JSON number) and `boolean` (`true`/`false`); a JSON `null`
//!   is SQL NULL except in a `json`/`jsonb` column.
//!
//! A column of another type, or of a type a source does not go to, refuses every event (the
//! message names the column, its type and the types the source goes to), as does a mapped
//! column the table lacks. Names (the table, optionally `schema.table`, and the columns) are
//! plain names (letters, digits, `_`, not starting with a digit, at most 63 bytes) and are
//! used as written: `Events` is not the table `events`.
//!
//! # Delivery
//!
//! - Nothing connects until the first send. A send connects if it has no connection (and
//!   with `create = true` creates the table if it does not exist), then writes every event of
//!   its deliveries, in order, with one `COPY ... FROM STDIN (FORMAT binary)` in one
//!   transaction: all the events are in the table, or none. Connecting may take 10 seconds,
//!   everything else (creating the table, reading its columns, the copy and the commit) 30
//!   seconds; a send that takes longer is retried.
//! - Retried (`SendError::Retry`, after dropping the connection: the next send reconnects): a
//!   failure to connect, a lost connection, a timeout, and every server error not listed
//!   below (among them `08` connection exceptions, `53` insufficient resources, `57`
//!   operator intervention such as `57P01` admin shutdown, `40001` serialization failures and
//!   `40P01` deadlocks). A commit whose answer is lost may have committed: at least once.
//! - Refused (`SendError::Reject`: the runner narrows the send down to the refused events and
//!   dead-letters them): SQLSTATE classes `22` (data exceptions: a value out of range, a
//!   `\u0000` in `jsonb`, text that is not valid in the database's encoding), `23` (integrity
//!   constraints: `NOT NULL`, `CHECK`, unique and foreign keys), `42` (the table or a column is
//!   missing, a type does not fit, no privilege), `54` (a program limit, such as a row too
//!   big for an index) and `P0` (an exception a trigger raised), and an event that does not
//!   fit its column (a key that is not UTF-8 for a `text` column). The message names the sink,
//!   the table, and the server's message and SQLSTATE (or the column and the event).

use super::{Destination, OpenError, Outgoing, SendError, SendFuture};

use bytes::{BufMut, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::str::FromStr;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::config::Host;
use tokio_postgres::error::DbError;
use tokio_postgres::types::{IsNull, Kind as PgKind, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};
use weir_format::EventRef;
use weir_format::json::event_ref_to_line;

/// `type = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Connection string (`host=127.0.0.1 port=5432 user=weir dbname=weir` or a
    /// `postgresql://` URL).
    pub url: String,
    /// The table (optionally `schema.table`).
    pub table: String,
    /// Create the table at start when it does not exist (default columns only).
    pub create: bool,
    /// Column name → what of the event goes there (`key`, `value`, `timestamp_ms`, `headers`,
    /// `route`, `value.FIELD`, `header.NAME`); empty for the default columns.
    pub columns: Vec<(String, String)>,
}

/// How long connecting (TCP, startup, authentication) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any other exchange with the server may take (creating the table, reading its
/// columns, a whole copy with its commit).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits for the server to take the goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The Unix time of PostgreSQL's epoch (2000-01-01T00:00:00Z), in milliseconds.
const PG_EPOCH_MS: i64 = 946_684_800_000;
/// How much of the server's DETAIL (which may quote a whole row) goes into a message.
const DETAIL_CHARS: usize = 200;
/// SQLSTATE classes that refuse the events rather than fail the attempt.
const REFUSING_CLASSES: [&str; 5] = ["22", "23", "42", "54", "P0"];
/// The default columns.
const DEFAULT_COLUMNS: [(&str, Source); 5] = [
    ("key", Source::Key),
    ("value", Source::Value),
    ("timestamp_ms", Source::TimestampMs),
    ("headers", Source::Headers),
    ("route", Source::Route),
];
/// The longest name PostgreSQL keeps whole.
const MAX_NAME_BYTES: usize = 63;

/// Checks a `columns` mapping (column name → source): every column a plain name, once, and
/// every source one of `key`, `value`, `value_text`, `timestamp_ms`, `headers`, `route`,
/// `value.FIELD`, `header.NAME`. An empty mapping is the default columns.
/// [`PostgresDestination::open`] checks it too; config loading calls this to refuse a bad
/// mapping at load.
pub fn check_columns(columns: &[(String, String)]) -> Result<(), String> {
    parse_columns(columns).map(drop)
}

/// Checks a table name: a plain name or `schema.table`.
pub fn check_table(table: &str) -> Result<(), String> {
    parse_table(table).map(drop)
}

/// Writes events as rows of a PostgreSQL table; see the module documentation for the table
/// and how failures are taken.
pub struct PostgresDestination {
    sink: String,
    /// `host:port/dbname`, for messages (never the connection string: it may hold a password).
    server: String,
    config: tokio_postgres::Config,
    target: Target,
    /// The connection; `None` before the first send and after a failure that may have left it
    /// broken.
    conn: Option<Connection>,
}

impl fmt::Debug for PostgresDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDestination")
            .field("sink", &self.sink)
            .field("server", &self.server)
            .field("table", &self.target.table)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl PostgresDestination {
    /// Checks the config (the connection string, the table name, the column mapping); nothing
    /// connects until the first send.
    pub fn open(name: &str, config: &PostgresConfig) -> Result<PostgresDestination, OpenError> {
        let error = |message: String| OpenError {
            sink: name.to_owned(),
            what: format!("postgres table `{}`", config.table),
            message,
        };
        let table = parse_table(&config.table).map_err(&error)?;
        let columns = parse_columns(&config.columns).map_err(&error)?;
        let pg = tokio_postgres::Config::from_str(&config.url).map_err(|e| {
            error(format!(
                "the connection string is not valid: {}",
                error_text(&e)
            ))
        })?;
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            return Err(error("the connection string names no host".into()));
        }
        if pg.get_user().is_none() {
            return Err(error("the connection string names no user".into()));
        }
        let columns = if columns.is_empty() {
            DEFAULT_COLUMNS
                .into_iter()
                .map(|(name, source)| Column {
                    name: name.to_owned(),
                    source,
                })
                .collect()
        } else {
            columns
        };
        Ok(PostgresDestination {
            sink: name.to_owned(),
            server: server(&pg),
            config: pg,
            target: Target::new(config.table.clone(), &table, columns, config.create),
            conn: None,
        })
    }

    /// Connects (creating the table if asked to) when not connected, reads the table's columns
    /// when not known, and copies.
    async fn deliver(&mut self, batch: &[Outgoing]) -> Result<(), Failure> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let conn = self.conn.insert(conn);
        let shape = match conn.shape.take() {
            Some(shape) => shape,
            None => {
                bounded(
                    "reading the table's columns",
                    self.target.shape(&conn.client),
                )
                .await??
            }
        };
        let shape = conn.shape.insert(shape);
        bounded(
            "writing the events",
            self.target.copy(&mut conn.client, shape, batch),
        )
        .await?
    }

    async fn connect(&self) -> Result<Connection, Failure> {
        let (client, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(NoTls))
                .await
                .map_err(|_| Failure::Timeout("connecting", CONNECT_TIMEOUT))?
                .map_err(Failure::Connect)?;
        let sink = self.sink.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(sink, "postgres connection ended: {e}");
            }
        });
        let conn = Connection {
            client,
            task: AbortOnDrop(task),
            shape: None,
        };
        if let Some(create) = &self.target.create {
            match bounded("creating the table", conn.client.batch_execute(create)).await? {
                Ok(()) => {}
                // Another client created the table between the check and the creation.
                Err(e)
                    if e.code()
                        .is_some_and(|c| matches!(c.code(), "23505" | "42P07")) => {}
                Err(e) => return Err(Failure::Db(e)),
            }
        }
        Ok(conn)
    }

    /// The `SendError` for a failure. A refusal forgets the table's columns (the table may
    /// have changed); anything else forgets the connection (it may be broken).
    fn failed(&mut self, failure: Failure) -> SendError {
        let refusal = match failure {
            Failure::Refused(message) => Ok(format!(": {message}")),
            Failure::Db(e) => match e.as_db_error() {
                Some(db) if refuses(db.code()) => {
                    Ok(format!(" refused the events: {}", db_text(db)))
                }
                _ => Err(error_text(&e)),
            },
            Failure::Connect(e) => Err(format!("cannot connect: {}", error_text(&e))),
            Failure::Timeout(what, limit) => {
                Err(format!("no answer within {} s ({what})", limit.as_secs()))
            }
        };
        match refusal {
            Ok(refusal) => {
                if let Some(conn) = &mut self.conn {
                    conn.shape = None;
                }
                SendError::Reject(format!(
                    "sink `{}`: postgres table `{}`{refusal}",
                    self.sink, self.target.table
                ))
            }
            Err(problem) => {
                self.conn = None;
                SendError::Retry(format!(
                    "sink `{}`: postgres {}: {problem}",
                    self.sink, self.server
                ))
            }
        }
    }
}

impl Destination for PostgresDestination {
    fn describe(&self) -> String {
        format!("postgres {} table {}", self.server, self.target.table)
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async move {
            if batch.iter().all(Outgoing::is_empty) {
                return Ok(());
            }
            match self.deliver(batch).await {
                Ok(()) => Ok(()),
                Err(failure) => Err(self.failed(failure)),
            }
        })
    }

    fn close(&mut self) -> SendFuture<'_> {
        Box::pin(async move {
            if let Some(Connection {
                client, mut task, ..
            }) = self.conn.take()
            {
                // Dropping the client makes the connection say goodbye and end.
                drop(client);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut task.0).await;
            }
            Ok(())
        })
    }
}

/// Why a send failed, before it is classified.
enum Failure {
    /// Connecting failed.
    Connect(tokio_postgres::Error),
    /// The server or the connection failed a statement.
    Db(tokio_postgres::Error),
    /// An exchange took longer than its limit.
    Timeout(&'static str, Duration),
    /// The events (or every event: the table does not fit the mapping) cannot go in.
    Refused(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Db(e)
    }
}

/// Runs `future` within the statement timeout.
async fn bounded<T>(what: &'static str, future: impl Future<Output = T>) -> Result<T, Failure> {
    tokio::time::timeout(STATEMENT_TIMEOUT, future)
        .await
        .map_err(|_| Failure::Timeout(what, STATEMENT_TIMEOUT))
}

/// Whether a SQLSTATE refuses the events.
fn refuses(code: &tokio_postgres::error::SqlState) -> bool {
    REFUSING_CLASSES.contains(&code.code().get(..2).unwrap_or(""))
}

/// `message (SQLSTATE code). Detail` of a server error.
fn db_text(db: &DbError) -> String {
    let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        text.push_str(". ");
        text.push_str(&excerpt(detail, DETAIL_CHARS));
    }
    text
}

/// A client error as text: the server's message when there is one, else the error and its
/// causes, `: `-separated.
fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db_text(db);
    }
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// At most `max` characters of `text`, `…` marking a cut.
fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// `host:port[,host:port]/dbname` of a connection config.
fn server(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = if config.get_hosts().is_empty() {
        config
            .get_hostaddrs()
            .iter()
            .map(ToString::to_string)
            .collect()
    } else {
        config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect()
    };
    let ports = config.get_ports();
    let hosts: Vec<String> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default();
    format!("{}/{db}", hosts.join(","))
}

/// The connection and what was learnt of the table through it.
struct Connection {
    client: Client,
    task: AbortOnDrop,
    /// The table's column types and the prepared copy; read on first use, forgotten after a
    /// refusal.
    shape: Option<Shape>,
}

/// The task driving a connection, stopped when dropped (a connection stuck on a dead server
/// would otherwise live on).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The mapped columns of the table as the server has them.
struct Shape {
    types: Vec<Type>,
    kinds: Vec<ColumnKind>,
    copy: Statement,
}

/// What a send writes, and the statements that do it.
struct Target {
    /// The table as configured, for messages.
    table: String,
    columns: Vec<Column>,
    /// `CREATE TABLE IF NOT EXISTS ...` when `create` is on.
    create: Option<String>,
    /// `SELECT <columns> FROM <table> LIMIT 0`: the columns' types.
    probe: String,
    /// `COPY <table> (<columns>) FROM STDIN (FORMAT binary)`.
    copy: String,
    /// Whether a column takes a field of the value (the value is parsed once per event).
    fields: bool,
}

impl Target {
    fn new(
        table: String,
        parsed: &(Option<String>, String),
        columns: Vec<Column>,
        create: bool,
    ) -> Target {
        let quoted = match parsed {
            (Some(schema), name) => format!("\"{schema}\".\"{name}\""),
            (None, name) => format!("\"{name}\""),
        };
        let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
        let names = names.join(", ");
        let create = create.then(|| {
            let definitions: Vec<String> = columns
                .iter()
                .map(|c| format!("\"{}\" {}", c.name, c.source.created_type()))
                .collect();
            format!(
                "CREATE TABLE IF NOT EXISTS {quoted} ({})",
                definitions.join(", ")
            )
        });
        let fields = columns
            .iter()
            .any(|c| matches!(c.source, Source::ValueField(_)));
        Target {
            table,
            create,
            probe: format!("SELECT {names} FROM {quoted} LIMIT 0"),
            copy: format!("COPY {quoted} ({names}) FROM STDIN (FORMAT binary)"),
            columns,
            fields,
        }
    }

    /// Reads the columns' types, checks every source goes to its column, prepares the copy.
    async fn shape(&self, client: &Client) -> Result<Shape, Failure> {
        let probe = client.prepare(&self.probe).await?;
        let types: Vec<Type> = probe.columns().iter().map(|c| c.type_().clone()).collect();
        let mut kinds = Vec::with_capacity(types.len());
        for (column, ty) in self.columns.iter().zip(&types) {
            let kind = ColumnKind::of(ty)
                .filter(|&kind| column.source.goes_to(kind))
                .ok_or_else(|| {
                    let takes: Vec<&str> = ColumnKind::ALL
                        .into_iter()
                        .filter(|&kind| column.source.goes_to(kind))
                        .map(ColumnKind::name)
                        .collect();
                    Failure::Refused(format!(
                        "column `{}` has type {}, which cannot take `{}`: it goes to a column of \
                         type {}",
                        column.name,
                        ty.name(),
                        column.source,
                        takes.join(", ")
                    ))
                })?;
            kinds.push(kind);
        }
        let copy = client.prepare(&self.copy).await?;
        Ok(Shape { types, kinds, copy })
    }

    /// Copies every event of `batch` in one transaction.
    async fn copy(
        &self,
        client: &mut Client,
        shape: &Shape,
        batch: &[Outgoing],
    ) -> Result<(), Failure> {
        let transaction = client.transaction().await?;
        let sink = transaction.copy_in(&shape.copy).await?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &shape.types));
        let mut row = Row::default();
        for delivery in batch {
            // Collected first: the events' iterator is not `Send`, and the loop awaits.
            let events: Vec<EventRef<'_>> = delivery.events().collect();
            for event in events {
                row.encode(self, &shape.kinds, &event)
                    .map_err(|(column, why)| {
                        Failure::Refused(format!(
                            "{column} of an event of pipeline `{}` (timestamp_ms {}): {why}",
                            delivery.pipeline(),
                            event.timestamp_ms()
                        ))
                    })?;
                writer.as_mut().write_raw(row.cells()).await?;
            }
        }
        writer.as_mut().finish().await?;
        transaction.commit().await?;
        Ok(())
    }
}

/// One mapped column.
struct Column {
    name: String,
    source: Source,
}

/// What of an event goes into a column.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Key,
    Value,
    ValueText,
    TimestampMs,
    Headers,
    Route,
    ValueField(String),
    Header(String),
}

impl Source {
    fn parse(text: &str) -> Result<Source, String> {
        Ok(match text {
            "key" => Source::Key,
            "value" => Source::Value,
            "value_text" => Source::ValueText,
            "timestamp_ms" => Source::TimestampMs,
            "headers" => Source::Headers,
            "route" => Source::Route,
            _ => {
                if let Some(field) = text.strip_prefix("value.") {
                    if field.is_empty() {
                        return Err("`value.` names no field: write `value.FIELD`".into());
                    }
                    Source::ValueField(field.to_owned())
                } else if let Some(name) = text.strip_prefix("header.") {
                    if name.is_empty() {
                        return Err("`header.` names no header: write `header.NAME`".into());
                    }
                    Source::Header(name.to_owned())
                } else {
                    return Err(format!(
                        "unknown source `{text}`: expected `key`, `value`, `value_text`, \
                         `timestamp_ms`, `headers`, `route`, `value.FIELD` or `header.NAME`"
                    ));
                }
            }
        })
    }

    /// The column type `create` gives it.
    fn created_type(&self) -> &'static str {
        match self {
            Source::Key | Source::Route | Source::Header(_) => "text",
            Source::ValueText => "text NOT NULL",
            Source::Value | Source::Headers => "jsonb NOT NULL",
            Source::TimestampMs => "bigint NOT NULL",
            Source::ValueField(_) => "jsonb",
        }
    }

    /// Whether it goes to a column of this kind.
    fn goes_to(&self, kind: ColumnKind) -> bool {
        use ColumnKind::*;
        match self {
            Source::Key | Source::Value | Source::ValueText | Source::Route | Source::Header(_) => {
                matches!(kind, Text | Bytea | Json | Jsonb)
            }
            Source::TimestampMs => matches!(kind, Int8 | Float8 | Text | Json | Jsonb | Timestamp),
            Source::Headers => matches!(kind, Json | Jsonb | Text),
            Source::ValueField(_) => matches!(
                kind,
                Json | Jsonb | Text | Int2 | Int4 | Int8 | Float4 | Float8 | Bool
            ),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Key => f.write_str("key"),
            Source::Value => f.write_str("value"),
            Source::ValueText => f.write_str("value_text"),
            Source::TimestampMs => f.write_str("timestamp_ms"),
            Source::Headers => f.write_str("headers"),
            Source::Route => f.write_str("route"),
            Source::ValueField(field) => write!(f, "value.{field}"),
            Source::Header(name) => write!(f, "header.{name}"),
        }
    }
}

/// The column types the sink fills, by their binary form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Text,
    Bytea,
    Json,
    Jsonb,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Bool,
    /// `timestamp` and `timestamptz` (the same binary form).
    Timestamp,
}

impl ColumnKind {
    const ALL: [ColumnKind; 11] = [
        ColumnKind::Text,
        ColumnKind::Bytea,
        ColumnKind::Json,
        ColumnKind::Jsonb,
        ColumnKind::Int2,
        ColumnKind::Int4,
        ColumnKind::Int8,
        ColumnKind::Float4,
        ColumnKind::Float8,
        ColumnKind::Bool,
        ColumnKind::Timestamp,
    ];

    /// The kind of a column type: a domain's base type, an enum as text.
    fn of(ty: &Type) -> Option<ColumnKind> {
        match ty.kind() {
            PgKind::Domain(base) => return ColumnKind::of(base),
            PgKind::Enum(_) => return Some(ColumnKind::Text),
            _ => {}
        }
        Some(match *ty {
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => ColumnKind::Text,
            Type::BYTEA => ColumnKind::Bytea,
            Type::JSON => ColumnKind::Json,
            Type::JSONB => ColumnKind::Jsonb,
            Type::INT2 => ColumnKind::Int2,
            Type::INT4 => ColumnKind::Int4,
            Type::INT8 => ColumnKind::Int8,
            Type::FLOAT4 => ColumnKind::Float4,
            Type::FLOAT8 => ColumnKind::Float8,
            Type::BOOL => ColumnKind::Bool,
            Type::TIMESTAMP | Type::TIMESTAMPTZ => ColumnKind::Timestamp,
            _ if ty.name() == "citext" => ColumnKind::Text,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ColumnKind::Text => "text",
            ColumnKind::Bytea => "bytea",
            ColumnKind::Json => "json",
            ColumnKind::Jsonb => "jsonb",
            ColumnKind::Int2 => "smallint",
            ColumnKind::Int4 => "integer",
            ColumnKind::Int8 => "bigint",
            ColumnKind::Float4 => "real",
            ColumnKind::Float8 => "double precision",
            ColumnKind::Bool => "boolean",
            ColumnKind::Timestamp => "timestamptz",
        }
    }
}

/// One row in binary COPY form: the fields' bytes back to back, and where each is (`None`
/// for NULL).
#[derive(Default)]
struct Row {
    bytes: Vec<u8>,
    cells: Vec<Option<(usize, usize)>>,
}

impl Row {
    /// Encodes `event`'s row; the error is (the column and its source, why it does not fit).
    fn encode(
        &mut self,
        target: &Target,
        kinds: &[ColumnKind],
        event: &EventRef<'_>,
    ) -> Result<(), (String, String)> {
        self.bytes.clear();
        self.cells.clear();
        let fields: Option<HashMap<String, &RawValue>> = if target.fields {
            serde_json::from_slice(event.value()).ok()
        } else {
            None
        };
        for (column, &kind) in target.columns.iter().zip(kinds) {
            let start = self.bytes.len();
            let out = &mut self.bytes;
            let filled = match &column.source {
                Source::Key => bytes_cell(event.key(), kind, false, out),
                Source::Value => bytes_cell(Some(event.value()), kind, true, out),
                Source::ValueText => bytes_cell(Some(event.value()), kind, false, out),
                Source::Route => bytes_cell(event.route().map(str::as_bytes), kind, false, out),
                Source::Header(name) => bytes_cell(event.header(name), kind, false, out),
                Source::TimestampMs => timestamp_cell(event.timestamp_ms(), kind, out),
                Source::Headers => headers_cell(event, kind, out),
                Source::ValueField(name) => field_cell(
                    fields.as_ref().and_then(|f| f.get(name)).copied(),
                    kind,
                    out,
                ),
            }
            .map_err(|why| {
                let column = format!(
                    "column `{}` ({}) cannot take `{}`",
                    column.name,
                    kind.name(),
                    column.source
                );
                (column, why)
            })?;
            self.cells.push(filled.then_some((start, self.bytes.len())));
        }
        Ok(())
    }

    fn cells(&self) -> impl ExactSizeIterator<Item = Cell<'_>> {
        self.cells
            .iter()
            .map(|cell| Cell(cell.map(|(start, end)| &self.bytes[start..end])))
    }
}

/// One field of a row, already in the binary form of its column's type.
#[derive(Debug)]
struct Cell<'a>(Option<&'a [u8]>);

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        Ok(match self.0 {
            None => IsNull::Yes,
            Some(bytes) => {
                out.put_slice(bytes);
                IsNull::No
            }
        })
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// The reason a source does not go to a kind of column (`goes_to` keeps this from happening).
fn mismatch(kind: ColumnKind) -> String {
    format!("it does not go to a {} column", kind.name())
}

/// Appends `text` as a JSON string.
fn json_string(text: &str, out: &mut Vec<u8>) -> Result<(), String> {
    serde_json::to_writer(out, text).map_err(|e| e.to_string())
}

/// Bytes (a key, a value, a header, a route) for a column; `json_as_is`: bytes that are a
/// JSON text go to a JSON column as themselves. `Ok(false)` for NULL.
fn bytes_cell(
    bytes: Option<&[u8]>,
    kind: ColumnKind,
    json_as_is: bool,
    out: &mut Vec<u8>,
) -> Result<bool, String> {
    let Some(bytes) = bytes else {
        return Ok(false);
    };
    let text = || std::str::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_owned());
    match kind {
        ColumnKind::Bytea => out.extend_from_slice(bytes),
        ColumnKind::Text => out.extend_from_slice(text()?.as_bytes()),
        ColumnKind::Json | ColumnKind::Jsonb => {
            if kind == ColumnKind::Jsonb {
                out.push(1);
            }
            if json_as_is && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
                out.extend_from_slice(bytes);
            } else {
                json_string(text()?, out)?;
            }
        }
        _ => return Err(mismatch(kind)),
    }
    Ok(true)
}

/// The event time for a column.
fn timestamp_cell(ms: i64, kind: ColumnKind, out: &mut Vec<u8>) -> Result<bool, String> {
    match kind {
        ColumnKind::Int8 => out.extend_from_slice(&ms.to_be_bytes()),
        ColumnKind::Float8 => out.extend_from_slice(&(ms as f64).to_be_bytes()),
        ColumnKind::Text | ColumnKind::Json => out.extend_from_slice(ms.to_string().as_bytes()),
        ColumnKind::Jsonb => {
            out.push(1);
            out.extend_from_slice(ms.to_string().as_bytes());
        }
        ColumnKind::Timestamp => {
            let micros = ms
                .checked_sub(PG_EPOCH_MS)
                .and_then(|ms| ms.checked_mul(1000))
                .ok_or_else(|| format!("{ms} is out of the range of a timestamp"))?;
            out.extend_from_slice(&micros.to_be_bytes());
        }
        _ => return Err(mismatch(kind)),
    }
    Ok(true)
}

/// The headers as JSON for a column.
fn headers_cell(event: &EventRef<'_>, kind: ColumnKind, out: &mut Vec<u8>) -> Result<bool, String> {
    match kind {
        ColumnKind::Jsonb => out.push(1),
        ColumnKind::Json | ColumnKind::Text => {}
        _ => return Err(mismatch(kind)),
    }
    let headers = event.headers();
    let mut names: Vec<&str> = headers.clone().map(|(name, _)| name).collect();
    names.sort_unstable();
    let unique = names.windows(2).all(|pair| pair[0] != pair[1]);
    let texts: Option<Vec<(&str, &str)>> = headers
        .map(|(name, value)| std::str::from_utf8(value).ok().map(|value| (name, value)))
        .collect();
    match texts.filter(|_| unique) {
        Some(texts) => {
            out.push(b'{');
            for (i, (name, value)) in texts.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_string(name, out)?;
                out.push(b':');
                json_string(value, out)?;
            }
            out.push(b'}');
        }
        None => {
            // A repeated name or a binary value: the JSON-lines form, as the file sink has it.
            #[derive(Deserialize)]
            struct Line<'a> {
                #[serde(borrow)]
                headers: Option<&'a RawValue>,
            }
            let line = event_ref_to_line(event);
            let parsed: Line<'_> = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            out.extend_from_slice(parsed.headers.map_or("{}", RawValue::get).as_bytes());
        }
    }
    Ok(true)
}

/// A top-level field of a JSON value (`None`: absent) for a column.
fn field_cell(
    field: Option<&RawValue>,
    kind: ColumnKind,
    out: &mut Vec<u8>,
) -> Result<bool, String> {
    let Some(field) = field else {
        return Ok(false);
    };
    let json = field.get();
    let number = |what: &str| format!("{} is not {what}", excerpt(json, 40));
    match kind {
        ColumnKind::Json => out.extend_from_slice(json.as_bytes()),
        ColumnKind::Jsonb => {
            out.push(1);
            out.extend_from_slice(json.as_bytes());
        }
        _ if json == "null" => return Ok(false),
        ColumnKind::Text => match serde_json::from_str::<String>(json) {
            Ok(text) => out.extend_from_slice(text.as_bytes()),
            Err(_) => out.extend_from_slice(json.as_bytes()),
        },
        ColumnKind::Int2 => {
            let n: i16 =
                serde_json::from_str(json).map_err(|_| number("an integer that fits smallint"))?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        ColumnKind::Int4 => {
            let n: i32 =
                serde_json::from_str(json).map_err(|_| number("an integer that fits integer"))?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        ColumnKind::Int8 => {
            let n: i64 =
                serde_json::from_str(json).map_err(|_| number("an integer that fits bigint"))?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        ColumnKind::Float4 => {
            let n: f32 = serde_json::from_str(json).map_err(|_| number("a number"))?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        ColumnKind::Float8 => {
            let n: f64 = serde_json::from_str(json).map_err(|_| number("a number"))?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        ColumnKind::Bool => {
            let b: bool = serde_json::from_str(json).map_err(|_| number("true or false"))?;
            out.push(u8::from(b));
        }
        ColumnKind::Bytea | ColumnKind::Timestamp => return Err(mismatch(kind)),
    }
    Ok(true)
}

/// A plain name: letters, digits and `_`, not starting with a digit, at most 63 bytes.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= MAX_NAME_BYTES;
    if plain {
        Ok(())
    } else {
        Err(format!(
            "{what} `{name}` is not a plain name: use letters, digits and `_`, not starting with \
             a digit, at most {MAX_NAME_BYTES} bytes"
        ))
    }
}

/// `table` or `schema.table`.
fn parse_table(table: &str) -> Result<(Option<String>, String), String> {
    match table.split_once('.') {
        None => check_name("table", table).map(|()| (None, table.to_owned())),
        Some((schema, name)) => {
            check_name("schema", schema)?;
            if name.contains('.') {
                return Err(format!(
                    "table `{table}`: expected `table` or `schema.table`"
                ));
            }
            check_name("table", name)?;
            Ok((Some(schema.to_owned()), name.to_owned()))
        }
    }
}

fn parse_columns(columns: &[(String, String)]) -> Result<Vec<Column>, String> {
    let mut parsed: Vec<Column> = Vec::with_capacity(columns.len());
    for (name, source) in columns {
        check_name("column", name)?;
        if parsed.iter().any(|c| c.name == *name) {
            return Err(format!("column `{name}` is mapped twice"));
        }
        let source = Source::parse(source).map_err(|e| format!("column `{name}`: {e}"))?;
        parsed.push(Column {
            name: name.clone(),
            source,
        });
    }
    Ok(parsed)
}
