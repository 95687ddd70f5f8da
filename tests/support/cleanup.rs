//! Deleting what a test declared on the broker. It runs on a thread and runtime of its own,
//! so that it works from `Drop` even when the test's runtime is gone or panicking.
#![allow(dead_code)] // shared by test targets that each use part of it

use lapin::{Connection, ConnectionProperties};

/// Delete `queues` and `exchanges` (missing ones are skipped), then return.
pub fn delete(url: &str, queues: Vec<String>, exchanges: Vec<String>) {
    let url = url.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
                return;
            };
            // A failed delete closes its channel, so each gets a fresh one.
            for q in &queues {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
            }
            for x in &exchanges {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(x.as_str().into(), Default::default())
                        .await;
                }
            }
            let _ = conn.close(200, "OK".into()).await;
        });
    })
    .join();
}

/// Deletes its queues and exchanges when dropped, also when the test panics.
pub struct DeleteOnDrop {
    pub url: String,
    pub queues: Vec<String>,
    pub exchanges: Vec<String>,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        delete(
            &self.url,
            std::mem::take(&mut self.queues),
            std::mem::take(&mut self.exchanges),
        );
    }
}
