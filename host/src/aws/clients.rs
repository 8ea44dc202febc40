//! SDK clients for one region, built from the standard credential and region
//! chain with the pipeline's endpoint overrides.

use super::errors::AwsError;
use crate::config::Region as RegionSettings;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use std::time::Duration;

/// The clients iotdr uses in one region.
#[derive(Clone, Debug)]
pub struct RegionClients {
    pub region: String,
    pub iot: aws_sdk_iot::Client,
    pub data: aws_sdk_iotdataplane::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// DynamoDB Streams: the `dynamodb-stream` source reads its table's stream.
    pub streams: aws_sdk_dynamodbstreams::Client,
}

impl RegionClients {
    /// Connects to `region`. Credentials come from the standard chain
    /// (environment, profile, web identity, container, instance metadata).
    /// The endpoint is the region setting's `endpoint_url`, else
    /// `AWS_ENDPOINT_URL` (read by the SDK), else AWS's own. The IoT data plane
    /// has an account-specific endpoint: `data_endpoint_url`, else the same
    /// override, else the one `DescribeEndpoint` reports. Without `shadows`
    /// (reading the source, the global registry) that lookup is skipped and
    /// the data-plane client is not to be used.
    pub async fn connect(region: &str, settings: &RegionSettings, shadows: bool) -> Result<RegionClients, AwsError> {
        let shared = sdk_config(region, settings.endpoint_url.as_deref()).await;
        let iot = aws_sdk_iot::Client::new(&shared);
        let dynamodb = aws_sdk_dynamodb::Client::new(&shared);
        let streams = aws_sdk_dynamodbstreams::Client::new(&shared);

        let data_endpoint = match (&settings.data_endpoint_url, &settings.endpoint_url) {
            (Some(url), _) | (None, Some(url)) => Some(url.clone()),
            (None, None) if !shadows => None,
            (None, None) if std::env::var_os("AWS_ENDPOINT_URL").is_some() => None,
            (None, None) if std::env::var_os("AWS_ENDPOINT_URL_IOT_DATA_PLANE").is_some() => None,
            (None, None) => {
                let endpoint = iot
                    .describe_endpoint()
                    .endpoint_type("iot:Data-ATS")
                    .send()
                    .await
                    .map_err(AwsError::from_sdk)?
                    .endpoint_address
                    .ok_or_else(|| AwsError::permanent("DescribeEndpoint", "no iot:Data-ATS endpoint address"))?;
                Some(format!("https://{endpoint}"))
            }
        };
        let mut data_config = aws_sdk_iotdataplane::config::Builder::from(&shared);
        if let Some(url) = data_endpoint {
            data_config = data_config.endpoint_url(url);
        }
        let data = aws_sdk_iotdataplane::Client::from_conf(data_config.build());
        Ok(RegionClients { region: region.to_string(), iot, data, dynamodb, streams })
    }
}

/// The SDK settings every iotdr client in `region` starts from: the
/// standard credential chain, rustls on ring, no SDK retries (iotdr retries
/// with its own budget and counts every attempt), short connect timeouts,
/// and `endpoint_url` when given (else `AWS_ENDPOINT_URL`, else AWS's own).
pub async fn sdk_config(region: &str, endpoint_url: Option<&str>) -> aws_config::SdkConfig {
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .http_client(http)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}
