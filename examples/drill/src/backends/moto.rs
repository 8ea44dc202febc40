//! A moto server for one test: started by the project's own script on a free
//! loopback port, stopped when dropped (also when the test panics).

use std::process::Command;

/// The secret key the tests give the SDK (moto takes any): distinctive, so
/// that a log that printed it is caught (`assert_no_secrets` in the tests).
pub const SECRET_ACCESS_KEY: &str = "iotdr-test-secret-6f1c0e9a";

pub struct Moto {
    pub url: String,
}

impl Moto {
    pub fn start() -> Moto {
        let script = super::root().join("scripts/moto.sh");
        let out = Command::new("bash").arg(&script).arg("start").output().expect("bash runs");
        assert!(out.status.success(), "scripts/moto.sh start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8(out.stdout).expect("UTF-8").trim().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "unexpected moto address {url:?}");
        Moto { url }
    }

    fn port(&self) -> &str {
        self.url.rsplit(':').next().expect("a port")
    }

    /// Stops the server process (SIGSTOP) or lets it go on (SIGCONT).
    /// Stopped, it keeps its data and accepts connections at the kernel's
    /// level, but answers nothing: requests hang until their clients give up,
    /// and those it had read are processed when it goes on.
    pub fn freeze(&self, frozen: bool) {
        let pidfile = super::root().join(format!(".venv/moto-{}.pid", self.port()));
        let pid = std::fs::read_to_string(&pidfile).expect("moto's pid file");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill").arg(signal).arg(pid.trim()).status().expect("kill runs");
        assert!(status.success(), "kill {signal} moto");
    }

    /// SDK config for `region` on this server, with moto's dummy credentials.
    pub async fn sdk_config(&self, region: &str) -> aws_config::SdkConfig {
        use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
        let http =
            aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .endpoint_url(&self.url)
            .http_client(http)
            .credentials_provider(aws_sdk_iot::config::Credentials::new(
                "testing",
                SECRET_ACCESS_KEY,
                None,
                None,
                "iotdr-tests",
            ))
            .load()
            .await
    }

    pub async fn iot(&self, region: &str) -> aws_sdk_iot::Client {
        aws_sdk_iot::Client::new(&self.sdk_config(region).await)
    }

    pub async fn data(&self, region: &str) -> aws_sdk_iotdataplane::Client {
        aws_sdk_iotdataplane::Client::new(&self.sdk_config(region).await)
    }

    pub async fn dynamodb(&self, region: &str) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk_config(region).await)
    }

    /// An event table in `region` keyed by `id`, with a NEW_IMAGE stream: the
    /// table an IoT rule fills for the `dynamodb-stream` source.
    pub async fn event_table(&self, region: &str, table: &str) -> aws_sdk_dynamodb::Client {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, StreamSpecification,
            StreamViewType,
        };
        let dynamodb = self.dynamodb(region).await;
        let key = AttributeDefinition::builder().attribute_name("id").attribute_type(ScalarAttributeType::S);
        let stream = StreamSpecification::builder().stream_enabled(true).stream_view_type(StreamViewType::NewImage);
        dynamodb
            .create_table()
            .table_name(table)
            .attribute_definitions(key.build().unwrap())
            .key_schema(KeySchemaElement::builder().attribute_name("id").key_type(KeyType::Hash).build().unwrap())
            .billing_mode(BillingMode::PayPerRequest)
            .stream_specification(stream.build().unwrap())
            .send()
            .await
            .unwrap();
        dynamodb
    }

    /// moto's own request ceiling in `region`: `calls` UpdateThing calls on
    /// the existing things `names(i)`, `concurrency` at a time, nothing else.
    /// Requests per second.
    pub async fn ceiling(
        &self,
        region: &str,
        calls: usize,
        concurrency: usize,
        names: impl Fn(usize) -> String,
    ) -> f64 {
        use futures_util::StreamExt;
        let iot = self.iot(region).await;
        let started = std::time::Instant::now();
        let probes = (0..calls).map(|i| {
            let request = iot.update_thing().thing_name(names(i)).attribute_payload(
                aws_sdk_iot::types::AttributePayload::builder().attributes("probe", "1").merge(true).build(),
            );
            async move {
                request.send().await.unwrap();
            }
        });
        futures_util::stream::iter(probes).buffer_unordered(concurrency).collect::<Vec<_>>().await;
        calls as f64 / started.elapsed().as_secs_f64()
    }

    /// Environment for an `iotdr` process that talks to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // A test that failed while the server was frozen: thaw it, so that it stops.
        let pidfile = super::root().join(format!(".venv/moto-{}.pid", self.port()));
        if let Ok(pid) = std::fs::read_to_string(pidfile) {
            let _ = Command::new("kill").arg("-CONT").arg(pid.trim()).output();
        }
        let script = super::root().join("scripts/moto.sh");
        let _ = Command::new("bash").arg(&script).arg("stop").arg(self.port()).output();
    }
}
