//! The error a plugin returns: a message, nothing else.
//!
//! It crosses the component boundary as a string (`result<_, string>` in the WIT), so a
//! message is all it carries. `?` converts any [`std::error::Error`] (serde_json, postcard,
//! `ParseIntError`, `Utf8Error`, ...) into it; [`Error::new`] makes one from a message and
//! [`Context`] adds what was being done: `e.json::<Order>().context("order")?` fails with
//! ``order: value: missing field `amount` at line 1 column 9``.
//!
//! Like `anyhow::Error`, [`Error`] itself does not implement `std::error::Error`: that is what
//! lets the blanket `From` exist. Messages are lowercase with no trailing period, like the
//! host's.

use std::fmt;

/// A plugin error: a message that the host logs and attaches to dead-lettered events.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with what was being done: `context: message`.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error {
            message: format!("{context}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.message, f)
    }
}

/// Any standard error converts, with its chain of sources: `outer: inner: root`.
impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(inner) = source {
            message.push_str(": ");
            message.push_str(&inner.to_string());
            source = inner.source();
        }
        Error { message }
    }
}

impl From<Error> for String {
    fn from(error: Error) -> Self {
        error.message
    }
}

/// Adds context to a failure: `.context("what")` on a `Result` or an `Option`.
pub trait Context<T> {
    /// Turns the failure into an [`Error`] whose message starts with `context: `. On an
    /// `Option`, `None` becomes an error whose message is `context`.
    fn context(self, context: impl fmt::Display) -> Result<T>;

    /// Like [`Context::context`], with the context computed only on failure.
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::new(format!("{context}: {e}")))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::new(format!("{}: {e}", context())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::new(context.to_string()))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::new(context().to_string()))
    }
}
