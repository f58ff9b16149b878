//! Acknowledgements: a submission to the bus completes once every shard that received part
//! of it has committed its part (WAL fsync), and fails if any part fails or is dropped.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

struct AckInner {
    failed: Mutex<Option<String>>,
    tx: Mutex<Option<oneshot::Sender<Result<(), String>>>>,
}

impl Drop for AckInner {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.get_mut().take() {
            let result = match self.failed.get_mut().take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            // The waiter may have gone away (client disconnected): nothing to tell then.
            let _ = tx.send(result);
        }
    }
}

/// The submitter's side of an acknowledgement; split it into one [`AckPart`] per shard.
pub struct Ack {
    inner: Arc<AckInner>,
}

/// Resolves when every part of the submission is committed (`Ok`) or one failed (`Err`).
pub type AckWaiter = oneshot::Receiver<Result<(), String>>;

impl Ack {
    /// A new acknowledgement and the receiver that learns its outcome.
    pub fn new() -> (Self, AckWaiter) {
        let (tx, rx) = oneshot::channel();
        let inner = AckInner { failed: Mutex::new(None), tx: Mutex::new(Some(tx)) };
        (Self { inner: Arc::new(inner) }, rx)
    }

    /// An acknowledgement nobody waits for (MQTT QoS 0).
    pub fn detached() -> Self {
        let inner = AckInner { failed: Mutex::new(None), tx: Mutex::new(None) };
        Self { inner: Arc::new(inner) }
    }

    /// One part of the submission, to be committed by the shard that holds it.
    pub fn part(&self) -> AckPart {
        AckPart { inner: Some(self.inner.clone()) }
    }

    /// Marks the whole submission failed.
    pub fn fail(&self, reason: String) {
        self.inner.failed.lock().get_or_insert(reason);
    }
}

/// One shard's share of a submission. Dropping it without [`AckPart::commit`] fails the
/// submission, so a part lost in a crash or a shutdown is never reported as durable.
pub struct AckPart {
    inner: Option<Arc<AckInner>>,
}

impl AckPart {
    /// This part is durable.
    pub fn commit(mut self) {
        self.inner = None;
    }

    /// This part failed.
    pub fn fail(mut self, reason: String) {
        if let Some(inner) = self.inner.take() {
            inner.failed.lock().get_or_insert(reason);
        }
    }
}

impl Drop for AckPart {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.failed.lock().get_or_insert_with(|| "dropped before commit".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_parts_committed_is_ok() {
        let (ack, mut rx) = Ack::new();
        let a = ack.part();
        let b = ack.part();
        drop(ack);
        a.commit();
        assert!(rx.try_recv().is_err(), "not complete until every part commits");
        b.commit();
        assert_eq!(rx.try_recv().ok(), Some(Ok(())));
    }

    #[test]
    fn dropped_part_fails() {
        let (ack, mut rx) = Ack::new();
        let a = ack.part();
        drop(ack);
        drop(a);
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
    }
}
