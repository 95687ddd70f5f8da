//! A TCP relay in front of the broker that can cut every connection through it, to test
//! what happens when the network fails.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

pub struct Relay {
    addr: SocketAddr,
    cut: broadcast::Sender<()>,
    accepted: watch::Receiver<usize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relay 127.0.0.1:<random port> to `upstream`.
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = broadcast::channel(4);
        let (count_tx, accepted) = watch::channel(0usize);
        let upstream = upstream.to_owned();
        let cut_tx = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count_tx.send_modify(|n| *n += 1);
                let mut cut = cut_tx.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.recv() => {} // dropping both sockets closes them
                    }
                });
            }
        });
        Relay {
            addr,
            cut,
            accepted,
            _task: task,
        }
    }

    /// An AMQP URL through the relay.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Close every connection currently open through the relay.
    pub fn cut(&self) {
        let _ = self.cut.send(());
    }

    /// Wait until at least `n` connections have been accepted in total.
    pub async fn wait_for_connections(&mut self, n: usize) {
        self.accepted.wait_for(|c| *c >= n).await.unwrap();
    }
}
