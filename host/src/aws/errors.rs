//! One error type for every AWS call, classified by what the applier does
//! about it: retry later (throttled, transient), converge (already exists,
//! not found), or give up with the service's own words.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429 or a throttling code: retry after a backoff.
    Throttled,
    /// 5xx, a timeout or a broken connection: retry after a backoff.
    Transient,
    /// The resource (or one the call names) does not exist in that region.
    NotFound,
    /// The resource exists already.
    AlreadyExists,
    /// The call conflicts with the resource's state (attached, versions, status).
    Conflict,
    /// Anything else: the request itself is wrong; retrying will not help.
    Permanent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AwsError {
    pub kind: ErrorKind,
    /// The service's error code (`ResourceNotFoundException`), or a description of the failure.
    pub code: String,
    pub message: String,
    pub status: Option<u16>,
    /// `resourceId` of a ResourceAlreadyExistsException (certificates carry it).
    pub resource_id: Option<String>,
}

impl AwsError {
    pub fn retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }

    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind == kind
    }

    pub fn permanent(code: &str, message: impl Into<String>) -> AwsError {
        AwsError {
            kind: ErrorKind::Permanent,
            code: code.to_string(),
            message: message.into(),
            status: None,
            resource_id: None,
        }
    }

    /// Classifies an SDK error of any AWS client.
    pub fn from_sdk<E>(error: SdkError<E, HttpResponse>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let transient = |code: &str, message: String| AwsError {
            kind: ErrorKind::Transient,
            code: code.to_string(),
            message,
            status: None,
            resource_id: None,
        };
        match &error {
            SdkError::TimeoutError(_) => transient("Timeout", "the request timed out".into()),
            SdkError::DispatchFailure(failure) => {
                let message = format!("{:?}", failure.as_connector_error());
                if failure.is_io() || failure.is_timeout() || failure.is_other() {
                    transient("ConnectionError", message)
                } else {
                    AwsError::permanent("DispatchFailure", message)
                }
            }
            SdkError::ResponseError(response) => {
                let status = response.raw().status().as_u16();
                let mut e = transient("ResponseError", format!("unreadable response with status {status}"));
                e.status = Some(status);
                // A success whose body could not be read was cut short (a
                // connection lost mid-answer, a server stopped): retry. An
                // unreadable 4xx other than 429 is the request's fault.
                if (400..500).contains(&status) && status != 429 {
                    e.kind = ErrorKind::Permanent;
                }
                e
            }
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let body = std::str::from_utf8(service.raw().body().bytes().unwrap_or_default()).unwrap_or_default();
                let code = error.code().unwrap_or("").to_string();
                let message = error.message().unwrap_or("").to_string();
                let resource_id = serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("resourceId").and_then(|r| r.as_str()).map(str::to_string));
                AwsError { kind: classify(&code, status), code, message, status: Some(status), resource_id }
            }
            other => AwsError::permanent("SdkError", format!("{other:?}")),
        }
    }
}

fn classify(code: &str, status: u16) -> ErrorKind {
    match code {
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "ProvisionedThroughputExceededException"
        | "LimitExceededException" => ErrorKind::Throttled,
        "ResourceNotFoundException" | "NotFoundException" => ErrorKind::NotFound,
        "ResourceAlreadyExistsException" => ErrorKind::AlreadyExists,
        "DeleteConflictException"
        | "VersionConflictException"
        | "ConflictException"
        | "CertificateStateException"
        | "VersionsLimitExceededException"
        | "ConditionalCheckFailedException" => ErrorKind::Conflict,
        "InternalFailureException" | "InternalServerException" | "ServiceUnavailableException" | "InternalError" => {
            ErrorKind::Transient
        }
        _ if status == 429 => ErrorKind::Throttled,
        _ if status >= 500 => ErrorKind::Transient,
        _ if status == 404 => ErrorKind::NotFound,
        _ => ErrorKind::Permanent,
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.status, self.message.is_empty()) {
            (Some(status), false) => write!(f, "{} (HTTP {status}): {}", self.code, self.message),
            (Some(status), true) => write!(f, "{} (HTTP {status})", self.code),
            (None, false) => write!(f, "{}: {}", self.code, self.message),
            (None, true) => f.write_str(&self.code),
        }
    }
}

impl std::error::Error for AwsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_cut_short_is_retried_and_an_unreadable_client_error_is_not() {
        use aws_sdk_iot::operation::attach_policy::AttachPolicyError;
        use aws_smithy_runtime_api::http::StatusCode;
        use aws_smithy_types::body::SdkBody;
        let unreadable = |status: u16| {
            let response = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
            AwsError::from_sdk(SdkError::<AttachPolicyError, HttpResponse>::response_error("cut short", response))
        };
        assert_eq!(unreadable(200).kind, ErrorKind::Transient);
        assert_eq!(unreadable(503).kind, ErrorKind::Transient);
        assert_eq!(unreadable(429).kind, ErrorKind::Transient);
        assert_eq!(unreadable(400).kind, ErrorKind::Permanent);
    }

    #[test]
    fn codes_and_statuses_decide_the_kind() {
        assert_eq!(classify("ThrottlingException", 400), ErrorKind::Throttled);
        assert_eq!(classify("", 429), ErrorKind::Throttled);
        assert_eq!(classify("", 503), ErrorKind::Transient);
        assert_eq!(classify("ResourceNotFoundException", 404), ErrorKind::NotFound);
        assert_eq!(classify("ResourceAlreadyExistsException", 409), ErrorKind::AlreadyExists);
        assert_eq!(classify("DeleteConflictException", 409), ErrorKind::Conflict);
        assert_eq!(classify("InvalidRequestException", 400), ErrorKind::Permanent);
    }
}
