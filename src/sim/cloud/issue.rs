//! `bmsgw sim cloud-issue`: the reference cloud seals a batch of vouchers
//! for one vehicle and hands it out as a ticket file instead of publishing
//! it, as an OEM backend would for the owner's phone or the head unit to
//! carry (`bmsgw ticket import FILE` on the vehicle).

use super::{CloudConfig, CloudService, ConfigError, Output, RegistryError, ServiceError};
use crate::auth::Rng;
use crate::cloud::envelope::KeyError;
use crate::cloud::messages::MAX_VOUCHERS;
use crate::cloud::ticket_file::{TicketFile, TicketFileError};
use crate::cloud::topics::VehicleId;

/// Why no ticket file was made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cloud HPKE key: {0}")]
    Key(#[from] KeyError),
    #[error("registries: {0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Service(#[from] ServiceError),
    #[error("count must be 1 to {MAX_VOUCHERS} (one batch); got {0}")]
    Count(usize),
    #[error(transparent)]
    Ticket(#[from] TicketFileError),
}

/// Seal `count` fresh vouchers for `charger_number` to `vehicle` with the
/// keys and registries `config` names.
pub fn issue_vouchers(
    config: &CloudConfig,
    vehicle: &VehicleId,
    charger_number: u32,
    count: usize,
    now_unix_ms: u64,
    rng: &mut dyn Rng,
) -> Result<TicketFile, IssueError> {
    if !(1..=MAX_VOUCHERS).contains(&count) {
        return Err(IssueError::Count(count));
    }
    let service = CloudService::new(
        config.load_registry()?,
        config.load_keys()?,
        config.settings.clone(),
    );
    match service.push_vouchers(vehicle, charger_number, count, now_unix_ms, rng)? {
        Output::Push {
            vehicle,
            topic,
            payload,
        } => Ok(TicketFile::new(vehicle, topic, payload)?),
        // push_vouchers returns nothing else.
        other => unreachable!("push_vouchers returned {other:?}"),
    }
}
