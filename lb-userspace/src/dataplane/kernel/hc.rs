//! Health checks through the tunnel: attaches `lb_hc_encap` (from the balancer object, so it
//! shares the pinned maps) to an interface's tc egress hook as a tcx link, pinned under
//! `<pin_dir>/hc-links/<iface>` like the XDP links, and adopted or upgraded through that pin.
//! tcx needs kernel 6.6+.
//!
//! What a deployment needs besides the attachment: the gateway's route to each VIP must leave
//! through an interface running this program, via a next hop that resolves (a default route via
//! the upstream router does; a bare `dev` route does not, since no host answers ARP for a VIP,
//! and the packet would wait on the neighbour entry before reaching tc egress), and the gateway's
//! reverse-path filter must accept the backends' replies, which come from the VIP.

use std::{fs, io, path::Path};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use lb_common::maps;

use super::{Attached, LinkAdoption, adopt_pinned_link, program_error};
use crate::dataplane::DataPlaneError;

/// Folder of the pinned tcx links, one per interface, under the pin folder.
pub(super) const LINK_DIR: &str = "hc-links";

/// Attaches `lb_hc_encap` to `iface`'s egress: adopts the link pinned for it (swapping the
/// program in place) or attaches anew and pins the link. Loads the program on first use.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    iface: &str,
) -> Result<Attached, DataPlaneError> {
    let link_dir = pin_dir.join(LINK_DIR);
    fs::create_dir_all(&link_dir).map_err(|source| DataPlaneError::Pin {
        path: link_dir.clone(),
        source,
    })?;
    let link_pin = link_dir.join(iface);
    let program = loaded_program(ebpf)?;

    if link_pin.exists() {
        match adopt_link(program, &link_pin) {
            Ok(()) => return Ok(Attached::Adopted),
            Err(LinkAdoption::Stale(reason)) => {
                tracing::warn!(iface, %reason, pin = %link_pin.display(), "stale health-check link pin, attaching anew");
                remove_pin(&link_pin)?;
            }
            Err(LinkAdoption::Failed(reason)) => {
                return Err(DataPlaneError::Interface {
                    iface: iface.to_owned(),
                    reason: format!(
                        "cannot adopt the pinned health-check link {}: {reason}",
                        link_pin.display()
                    ),
                });
            }
        }
    }

    let interface_error = |reason: String| DataPlaneError::Interface {
        iface: iface.to_owned(),
        reason,
    };
    let link_id = program
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| {
            interface_error(format!(
                "attaching {} to tc egress (tcx, kernel 6.6+): {e}",
                maps::PROG_HC
            ))
        })?;
    let link = program
        .take_link(link_id)
        .map_err(|e| program_error(maps::PROG_HC, e))?;
    let fd_link = FdLink::try_from(link)
        .map_err(|e| interface_error(format!("the tcx link is not a bpf_link: {e}")))?;
    fd_link.pin(&link_pin).map_err(|e| DataPlaneError::Pin {
        path: link_pin.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(Attached::New)
}

/// The program, loaded into the kernel if it was not yet.
pub(super) fn loaded_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataPlaneError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(maps::PROG_HC)
        .ok_or(DataPlaneError::MissingMap {
            name: maps::PROG_HC,
        })?
        .try_into()
        .map_err(|e| program_error(maps::PROG_HC, e))?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| program_error(maps::PROG_HC, e))?;
    }
    Ok(program)
}

/// Swaps `program` into the tcx link pinned at `pin` (`BPF_LINK_UPDATE`).
pub(super) fn adopt_link(program: &mut SchedClassifier, pin: &Path) -> Result<(), LinkAdoption> {
    // Refuses a pin that is not a tcx link.
    adopt_pinned_link::<_, SchedClassifierLink, _>(
        program,
        pin,
        SchedClassifier::attach_to_link,
        SchedClassifier::take_link,
    )
}

fn remove_pin(pin: &Path) -> Result<(), DataPlaneError> {
    fs::remove_file(pin).map_err(|source| DataPlaneError::Pin {
        path: pin.to_path_buf(),
        source,
    })
}
