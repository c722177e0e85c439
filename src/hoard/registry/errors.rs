//! Registry failures, told apart: the registry or the way to it unreachable for now (what
//! `hoard sync` waits out) from an answer, which is final; refusals for lack of credentials
//! say where credentials go.

use crate::{Error, Subject};

pub(super) fn subject(r: &str) -> Subject {
    Subject::Other(format!("registry {r}"))
}

/// An error with its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = x.source();
    }
    s
}

/// The kinds of I/O error that mean "the registry cannot be reached now" (what `hoard
/// sync` waits out); every other failure is an answer, and final.
pub fn unreachable(e: &Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e, Error::Io { path: Subject::Other(s), source, .. }
        if s.starts_with("registry ")
            && matches!(source.kind(), ConnectionRefused | ConnectionReset | ConnectionAborted
                | NotConnected | TimedOut | BrokenPipe | UnexpectedEof | HostUnreachable
                | NetworkUnreachable | NetworkDown))
}

/// A failure of the registry or the way to it, classified (see [`unreachable`]).
pub(super) fn net_err(r: &str, what: &str, e: &(dyn std::error::Error + 'static)) -> Error {
    use oci_client::errors::OciDistributionError as Oci;
    use std::io::ErrorKind;
    fn of_reqwest(x: &reqwest::Error) -> ErrorKind {
        if x.is_timeout() {
            ErrorKind::TimedOut
        } else if x
            .status()
            .is_some_and(|s| [429, 502, 503, 504].contains(&s.as_u16()))
        {
            ErrorKind::ConnectionRefused
        } else if x.is_connect() || x.is_request() || x.is_body() || x.is_decode() {
            ErrorKind::ConnectionReset
        } else {
            ErrorKind::Other
        }
    }
    fn of_io(x: &std::io::Error) -> ErrorKind {
        // A download's stream wraps the HTTP client's errors in io::Error::other.
        match x.get_ref().and_then(|i| i.downcast_ref::<reqwest::Error>()) {
            Some(r) => of_reqwest(r),
            None => x.kind(),
        }
    }
    let kind = match e.downcast_ref::<Oci>() {
        Some(Oci::RequestError(x)) => of_reqwest(x),
        Some(Oci::IoError(x)) => of_io(x),
        // A proxy or registry that is restarting or overloaded: try again later.
        Some(Oci::ServerError { code, .. }) if [429, 502, 503, 504].contains(code) => {
            ErrorKind::ConnectionRefused
        }
        Some(Oci::RegistryError { envelope, .. })
            if envelope
                .errors
                .iter()
                .any(|x| x.code == oci_client::errors::OciErrorCode::Toomanyrequests) =>
        {
            ErrorKind::ConnectionRefused
        }
        Some(_) => ErrorKind::Other,
        None => e
            .downcast_ref::<std::io::Error>()
            .map(of_io)
            .or_else(|| e.downcast_ref::<reqwest::Error>().map(of_reqwest))
            .unwrap_or(ErrorKind::Other),
    };
    let denied = match e.downcast_ref::<Oci>() {
        Some(Oci::AuthenticationFailure(_) | Oci::UnauthorizedError { .. }) => true,
        Some(Oci::RequestError(x)) => x.status().is_some_and(|s| [401, 403].contains(&s.as_u16())),
        Some(Oci::ServerError { code, .. }) => [401, 403].contains(code),
        Some(Oci::RegistryError { envelope, .. }) => envelope.errors.iter().any(|x| {
            use oci_client::errors::OciErrorCode::{Denied, Unauthorized};
            matches!(x.code, Denied | Unauthorized)
        }),
        _ => false,
    };
    let mut text = format!("{what}: {}", chain(e));
    if denied {
        text.push_str(
            " (credentials: VMICACHE_REGISTRY_USER and VMICACHE_REGISTRY_PASSWORD, or VMICACHE_REGISTRY_TOKEN, or the configuration's registry: section)",
        );
    }
    if denied || matches!(kind, ErrorKind::Other | ErrorKind::InvalidData) {
        Error::refused(subject(r), text)
    } else {
        Error::io(subject(r), "registry", std::io::Error::new(kind, text))
    }
}
