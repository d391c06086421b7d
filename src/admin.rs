//! The admin socket: a unix socket only its owner (root) may use, answering `status`
//! with the agent's [`Status`] as one line of JSON. `vipd status` is its client.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::core::status::{Report, Status};

/// Where the socket is unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vipd/vipd.sock";

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the admin socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: another vipd is already serving it")]
    InUse { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no vipd is running: nothing answers at {path} (start `vipd run`, or pass --socket)")]
    NotRunning { path: PathBuf },
    #[error("admin socket {path}: permission denied (vipd status must run as root)")]
    Denied { path: PathBuf },
    #[error("admin socket {path}: unexpected answer: {reason}")]
    BadAnswer { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdminError + '_ {
    move |source| AdminError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Bind the socket: its directory is made (0700) if missing, a stale socket left by a
/// vipd that died is replaced, a live one is refused, and the socket is made 0600.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(path))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io(path))?;
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    Ok(listener)
}

/// Answer requests until `shutdown`; the socket file is removed at the end.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    status: watch::Receiver<Report>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let status = status.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, status).await {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(stream: UnixStream, status: watch::Receiver<Report>) -> std::io::Result<()> {
    // The file mode already keeps others out; the peer's uid is checked as well.
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    if peer != 0 && peer != me {
        tracing::warn!(uid = peer, "admin request refused: not root");
        write.write_all(b"{\"error\":\"permission denied\"}\n").await?;
        return Ok(());
    }
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(256));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let body = match line.trim() {
        "status" => {
            // The wire form is made here, at the edge, and nowhere else.
            let wire = status.borrow().to_status();
            serde_json::to_string(&wire).map_err(std::io::Error::other)?
        }
        other => serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string(),
    };
    write.write_all(body.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Ask the vipd serving `path` for its status.
pub fn query(path: &Path) -> Result<Status, AdminError> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => AdminError::NotRunning {
            path: path.to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => AdminError::Denied {
            path: path.to_owned(),
        },
        _ => io(path)(e),
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io(path))?;
    stream.write_all(b"status\n").map_err(io(path))?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(io(path))?;
    let bad = |reason: String| AdminError::BadAnswer {
        path: path.to_owned(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(e) = value.get("error").and_then(|e| e.as_str()) {
        return Err(if e == "permission denied" {
            AdminError::Denied {
                path: path.to_owned(),
            }
        } else {
            bad(e.to_owned())
        });
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp_socket() -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "vipd-admin-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (dir.join("sub").join("vipd.sock"), dir)
    }

    #[tokio::test]
    async fn status_is_served_to_the_owner_and_the_socket_is_private() {
        let (path, dir) = temp_socket();
        let listener = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        let mut status = Report {
            last_sync: 42,
            ..Default::default()
        };
        let (tx, rx) = watch::channel(status.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, path.clone(), rx, async {
            let _ = stop_rx.await;
        }));

        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || query(&p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, status.to_status());
        status.last_sync = 43;
        tx.send_replace(status.clone());
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || query(&p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.last_sync, 43, "the latest status is served");

        // A second vipd cannot take the socket over.
        assert!(matches!(bind(&path), Err(AdminError::InUse { .. })));
        let _ = stop_tx.send(());
        server.await.unwrap();
        assert!(!path.exists(), "the socket is removed on shutdown");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_no_server_is_said_plainly() {
        let (path, dir) = temp_socket();
        drop(bind(&path).unwrap()); // a vipd that died: the file stays, nobody listens
        assert!(path.exists());
        let e = query(&path).unwrap_err();
        assert!(matches!(e, AdminError::NotRunning { .. }), "{e}");
        assert!(e.to_string().contains("no vipd is running"), "{e}");
        let listener = bind(&path).expect("a stale socket is replaced");
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }
}
