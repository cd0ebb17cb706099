//! The admin endpoint: `/metrics` for Prometheus and `/status` for `lb status`, on one small
//! HTTP/1.1 listener (loopback by default). Requests are answered by the controller loop, which
//! owns the maps, so nothing is shared or locked.

use std::{io::Read as _, io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tracing::debug;

/// Where `lb run` serves metrics unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9617";

/// A request for the controller to answer.
pub enum Request {
    Metrics(oneshot::Sender<Result<String>>),
    Status(oneshot::Sender<Result<String>>),
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr} (--metrics-listen)"))
}

/// Accepts connections until the controller goes away.
pub async fn serve(listener: TcpListener, requests: mpsc::Sender<Request>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests).await {
                debug!("admin request from {peer}: {e:#}");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, requests: mpsc::Sender<Request>) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 || head.len() > 8192 {
            bail!("incomplete request");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (tx, rx) = oneshot::channel();
    let (content_type, request) = match (method, path) {
        ("GET", "/metrics") => (
            "text/plain; version=0.0.4; charset=utf-8",
            Request::Metrics(tx),
        ),
        ("GET", "/status") => ("application/json", Request::Status(tx)),
        _ => {
            return respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "try /metrics or /status\n",
            )
            .await;
        }
    };
    requests
        .send(request)
        .await
        .map_err(|_| anyhow!("controller gone"))?;
    match rx.await? {
        Ok(body) => respond(&mut stream, "200 OK", content_type, &body).await,
        Err(e) => {
            respond(
                &mut stream,
                "500 Internal Server Error",
                "text/plain",
                &format!("{e:#}\n"),
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// `GET path` from a running lb's admin endpoint (blocking; for the CLI).
pub fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to lb's admin endpoint {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed answer from {addr}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}
