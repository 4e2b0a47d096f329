//! Errors of [`AuthInject`](super::AuthInject).

pub use crate::error::{CredentialMisplaced, NoBackendChosen, TokenUnavailable};
