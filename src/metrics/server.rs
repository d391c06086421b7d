//! The metrics endpoint over HTTP/1.1 (hyper): `GET` or `HEAD /metrics` answers the
//! scrape, any other path 404, any other method 405; one request per connection,
//! answered and closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE as CONTENT_TYPE_HEADER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::{Metrics, MetricsError, CONTENT_TYPE};

/// The largest request head accepted (hyper's smallest buffer limit).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections answered at once; more are closed at once.
const CONNECTIONS: usize = 8;

/// The metrics endpoint: bound, not serving yet.
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
    metrics: Metrics,
}

impl MetricsServer {
    /// Listen on `addr`; a failure names the address.
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self, MetricsError> {
        let bind_error = |error| MetricsError::Bind { addr, error };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(MetricsServer {
            listener,
            addr,
            metrics,
        })
    }

    /// The address bound (its port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer scrapes until `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        info!(listen = %self.addr, "metrics served");
        let slots = Arc::new(Semaphore::new(CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        debug!(%peer, "metrics: too many connections; closed");
                        continue;
                    };
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        let span = tracing::debug_span!("metrics_connection", %peer);
                        let _entered = span.enter();
                        if let Err(error) = answer(stream, metrics).await {
                            debug!(%error, "metrics: connection failed");
                        }
                        drop(slot);
                    });
                }
                Err(error) => {
                    warn!(%error, "metrics: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Answer the one request of a connection, then close it. hyper answers a request it
/// cannot parse with 400 itself, and leaves the body out of an answer to `HEAD`.
async fn answer(stream: TcpStream, metrics: Metrics) -> Result<(), hyper::Error> {
    let service = service_fn(move |request: Request<Incoming>| {
        let metrics = metrics.clone();
        async move { Ok::<_, Infallible>(respond(request.method(), request.uri().path(), &metrics).await) }
    });
    http1::Builder::new()
        .keep_alive(false)
        // `Content-Type`, not `content-type`: HTTP does not care, but people reading a
        // capture or a curl -i do, and the endpoint has always written it so.
        .title_case_headers(true)
        .max_buf_size(MAX_REQUEST_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// The response to `method` on `path` (the query string already left out).
async fn respond(method: &Method, path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        return response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match metrics.render().await {
        Ok(body) => response(StatusCode::OK, CONTENT_TYPE, body.into()),
        Err(error) => {
            warn!(%error, "metrics scrape failed");
            response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "scrape failed\n".into(),
            )
        }
    }
}

/// A response that closes the connection; hyper adds its `Content-Length`.
fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
