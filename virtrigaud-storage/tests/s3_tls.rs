//! TLS is verified by default: an S3 endpoint with a self-signed certificate (the nginx peer's
//! TLS listener) is refused unless verification is turned off explicitly.

#![cfg(feature = "s3")]

use virtrigaud_core::{ErrorKind, PutOptions, StorageBackend};
use virtrigaud_storage::s3::{RetryConfig, S3Backend, S3Config};

#[tokio::test]
async fn self_signed_endpoint_is_refused_by_default() {
    let Some(url) = virtrigaud_testkit::peer_env("VIRTRIGAUD_HTTPS_URL", "nginx.sh") else {
        return;
    };
    let origin: String = url.split('/').take(3).collect::<Vec<_>>().join("/");
    let config = |verify: bool| {
        let mut c = S3Config::new("tlsbucket")
            .with_endpoint(origin.clone())
            .with_credentials("AKIDEXAMPLE", "not-a-secret");
        c.retry = RetryConfig {
            max_retries: 1,
            min_delay: std::time::Duration::from_millis(10),
            max_delay: std::time::Duration::from_millis(20),
        };
        c.tls_verify = verify;
        c
    };
    assert!(
        S3Config::new("b").tls_verify,
        "verification is on by default"
    );
    let e = S3Backend::new(config(true))
        .unwrap()
        .stat("some/key")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    // Refused again on every retry: not retryable, and the message says what to do.
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("tls_verify"), "{e}");
    // The same through the put path (our own signed requests, not opendal's).
    let b = S3Backend::new(config(true)).unwrap();
    let put = async {
        let mut sink = b.put("some/key", &PutOptions::default()).await?;
        sink.write(bytes::Bytes::from_static(b"x")).await?;
        sink.commit().await
    };
    let e = put.await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("tls_verify"), "{e}");
    // With verification off the TLS handshake succeeds and nginx answers (not an S3 server).
    let e2 = S3Backend::new(config(false))
        .unwrap()
        .stat("some/key")
        .await
        .unwrap_err();
    assert_ne!(e2.kind(), ErrorKind::Network, "{e2}");
}
