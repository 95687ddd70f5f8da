//! The shape of every layer that decides about a message on the spot: answer for it, or
//! let it (perhaps rewritten) go on to the layers below.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tower_service::Service;

use crate::disposition::Disposition;
use crate::message::Message;

/// A decision taken on each message before it goes on: `Some` answers for it (a skip, a
/// dead-letter…), `None` lets it through, perhaps rewritten. The filter, transform,
/// upcast, validate and JSON body layers are checks; a layer of your own can be one too,
/// served by [`Checked`] with no future of its own.
pub trait Check: Clone + Send + Sync + 'static {
    /// Decide about `message`.
    fn check(&self, message: &mut Message) -> Option<Disposition>;
}

/// The service of a [`Check`] layer: the check, then the inner service.
#[derive(Debug, Clone)]
pub struct Checked<S, C> {
    inner: S,
    check: C,
}

impl<S, C> Checked<S, C> {
    /// `check` in front of `inner`.
    pub fn new(inner: S, check: C) -> Checked<S, C> {
        Checked { inner, check }
    }
}

impl<S, C> Service<Message> for Checked<S, C>
where
    S: Service<Message, Response = Disposition, Error = Infallible>,
    C: Check,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = Either<Ready<Result<Disposition, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut message: Message) -> Self::Future {
        match self.check.check(&mut message) {
            Some(answer) => Either::Left(ready(Ok(answer))),
            None => Either::Right(self.inner.call(message)),
        }
    }
}
