//! Serving one HTTP/1.1 connection until it ends or a stop comes, for the daemon's two endpoints (the
//! metrics and the credential exchange).

use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;

use crate::shutdown::Shutdown;

/// Serves `service` on `io` until the peer is done or `stop` fires; then the response under way, if
/// any, is finished and the connection closed (a stalled peer gets a second).
pub async fn serve_connection<T, S>(
    io: T,
    service: S,
    mut stop: Shutdown,
) -> Result<(), hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(Duration::from_secs(1), conn).await.unwrap_or(Ok(()))
        }
    }
}
