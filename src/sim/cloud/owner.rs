//! The owner's app: it approves or denies a held request by sealing an
//! [`OwnerApproval`] with the owner's key to the cloud, on the vehicle's
//! `approval` topic (no correlation data).

use crate::auth::Rng;
use crate::cloud::envelope::{self, EnvelopeError, KeyPair, PublicKey};
use crate::cloud::messages::{Approval, OwnerApproval, Payload};
use crate::cloud::topics;

/// A sealed approval to publish at QoS 1 on `topic`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingApproval {
    pub topic: String,
    pub payload: Vec<u8>,
}

pub fn seal_approval(
    approval: &OwnerApproval,
    owner: &KeyPair,
    cloud: &PublicKey,
    rng: &mut dyn Rng,
) -> Result<OutgoingApproval, EnvelopeError> {
    let topic = topics::approval(&approval.vehicle_id);
    let payload = envelope::seal(
        cloud,
        owner,
        &topic,
        &[],
        &Approval::Owner(approval.clone()).encode(),
        rng,
    )?;
    Ok(OutgoingApproval { topic, payload })
}
