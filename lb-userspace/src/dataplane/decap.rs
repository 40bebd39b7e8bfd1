//! Backend-side programs: `lb_decap` strips the outer IPIP header of packets for the VIPs this
//! host serves, and `xdp_pass` is the trivial program veth peers need before native `XDP_TX` or
//! redirects into them work. Both stay attached while their handle lives.

use std::net::IpAddr;

use aya::{Ebpf, maps::HashMap, programs::Xdp};
use lb_common::{VipKey, maps};

use super::{DataPlaneError, kernel::AttachMode};

/// Programs attached from the decap object; dropping it detaches them.
pub struct DecapHandle {
    _ebpf: Ebpf,
}

/// Attaches `lb_decap` to every interface in `ifaces` (in the calling thread's network
/// namespace) and lets it decapsulate packets whose inner destination is one of `vips`.
pub fn attach_decap(
    ifaces: &[String],
    mode: AttachMode,
    vips: &[IpAddr],
) -> Result<DecapHandle, DataPlaneError> {
    let mut ebpf = load()?;
    {
        let map = ebpf
            .map_mut(maps::DECAP_VIPS)
            .ok_or(DataPlaneError::MissingMap {
                name: maps::DECAP_VIPS,
            })?;
        let mut set: HashMap<_, VipKey, u32> =
            HashMap::try_from(map).map_err(|e| DataPlaneError::map(maps::DECAP_VIPS, e))?;
        for vip in vips {
            set.insert(VipKey::new(*vip, 0, 0), 1, 0)
                .map_err(|e| DataPlaneError::map(maps::DECAP_VIPS, e))?;
        }
    }
    attach_all(&mut ebpf, maps::PROG_DECAP, ifaces, mode)?;
    Ok(DecapHandle { _ebpf: ebpf })
}

/// Attaches `xdp_pass` to every interface in `ifaces`.
pub fn attach_pass(ifaces: &[String], mode: AttachMode) -> Result<DecapHandle, DataPlaneError> {
    let mut ebpf = load()?;
    attach_all(&mut ebpf, maps::PROG_PASS, ifaces, mode)?;
    Ok(DecapHandle { _ebpf: ebpf })
}

fn load() -> Result<Ebpf, DataPlaneError> {
    Ebpf::load(crate::decap_object()).map_err(|e| DataPlaneError::Load(Box::new(e)))
}

fn attach_all(
    ebpf: &mut Ebpf,
    name: &'static str,
    ifaces: &[String],
    mode: AttachMode,
) -> Result<(), DataPlaneError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataPlaneError::MissingMap { name })?
        .try_into()
        .map_err(|e| DataPlaneError::Program {
            name,
            source: Box::new(e),
        })?;
    program.load().map_err(|e| DataPlaneError::Program {
        name,
        source: Box::new(e),
    })?;
    let xdp_mode = mode.xdp_mode();
    for iface in ifaces {
        program
            .attach(iface, xdp_mode)
            .map_err(|e| DataPlaneError::Interface {
                iface: iface.clone(),
                reason: format!("attaching {name}: {e}"),
            })?;
    }
    Ok(())
}
