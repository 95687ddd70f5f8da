//! A TCP relay in front of the broker that can cut every connection through it, or stall
//! them (half-open: the sockets stay open but no byte moves), to test network failures.
#![allow(dead_code)] // shared by test targets that each use part of it

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

#[derive(Clone, Copy, Debug)]
enum Fault {
    Cut,
    Stall,
}

pub struct Relay {
    addr: SocketAddr,
    faults: broadcast::Sender<Fault>,
    accepted: watch::Receiver<usize>,
    refusing: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relay 127.0.0.1:<random port> to `upstream`.
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (faults, _) = broadcast::channel(4);
        let (count_tx, accepted) = watch::channel(0usize);
        let upstream = upstream.to_owned();
        let faults_tx = faults.clone();
        // Stalled connections are parked here, open and silent, for as long as the relay lives.
        let parked: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let refusing = Arc::new(AtomicBool::new(false));
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once, as a broker that is down
                }
                count_tx.send_modify(|n| *n += 1);
                let mut fault = faults_tx.subscribe();
                let upstream = upstream.clone();
                let parked = parked.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let fault = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        fault = fault.recv() => fault,
                    };
                    if let Ok(Fault::Stall) = fault {
                        parked.lock().unwrap().push((client, server));
                    } // a cut drops both sockets, which closes them
                });
            }
        });
        Relay {
            addr,
            faults,
            accepted,
            refusing,
            _task: task,
        }
    }

    /// An AMQP URL through the relay, with `query` appended (e.g. `?heartbeat=2`).
    pub fn url_with(&self, query: &str) -> String {
        format!("amqp://guest:guest@{}/%2f{query}", self.addr)
    }

    /// An AMQP URL through the relay.
    pub fn url(&self) -> String {
        self.url_with("")
    }

    /// Close every connection currently open through the relay.
    pub fn cut(&self) {
        let _ = self.faults.send(Fault::Cut);
    }

    /// Cut every connection and close new ones at once until [`up`](Relay::up): the broker
    /// is down.
    pub fn down(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Relay new connections again after [`down`](Relay::down).
    pub fn up(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    /// Stop moving bytes on every connection currently open through the relay, without
    /// closing it: a half-open connection only heartbeats can detect. New connections work.
    pub fn stall(&self) {
        let _ = self.faults.send(Fault::Stall);
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Wait until at least `n` connections have been accepted in total.
    pub async fn wait_for_connections(&mut self, n: usize) {
        self.accepted.wait_for(|c| *c >= n).await.unwrap();
    }
}
