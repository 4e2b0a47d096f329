//! Errors of [`Endpoint`](super::Endpoint).

pub use crate::error::{CredentialMisplaced, InvalidTarget, NoBackendChosen};
