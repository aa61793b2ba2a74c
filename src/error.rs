//! The crate's top-level error: what stops sandlet from starting or serving.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Setup(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}
