//! Backend-side programs: `lb_decap` strips the outer IPIP (or GUE) header of packets for the
//! VIPs this host serves, and `xdp_pass` is the trivial program veth peers need before native
//! `XDP_TX` or redirects into them work. Both stay attached while their handle lives.

use std::net::IpAddr;

use aya::{Ebpf, maps::HashMap, programs::Xdp};
use lb_common::{VipKey, maps};

use super::{DataPlaneError, kernel::AttachMode};
use crate::config::DEFAULT_GUE_PORT;

/// Programs attached from the decap object; dropping it detaches them.
pub struct DecapHandle {
    _ebpf: Ebpf,
}

/// Attaches `lb_decap` to every interface in `ifaces` (in the calling thread's network
/// namespace) and lets it decapsulate packets whose inner destination is one of `vips`: IPIP,
/// and GUE on the default port ([`DEFAULT_GUE_PORT`]).
pub fn attach_decap(
    ifaces: &[String],
    mode: AttachMode,
    vips: &[IpAddr],
) -> Result<DecapHandle, DataPlaneError> {
    attach_decap_with(ifaces, mode, vips, Some(DEFAULT_GUE_PORT))
}

/// `LB_DECAP_VIPS`' value for a VIP: the GUE port in network order in the low 16 bits of the
/// native u32 (the program compares it with the UDP header's field as read), 0 for IPIP only.
pub fn decap_value(gue_port: Option<u16>) -> u32 {
    gue_port.map_or(0, |port| u32::from(port.to_be()))
}

/// [`attach_decap`] with the GUE port to accept (`None`: IPIP only).
pub fn attach_decap_with(
    ifaces: &[String],
    mode: AttachMode,
    vips: &[IpAddr],
    gue_port: Option<u16>,
) -> Result<DecapHandle, DataPlaneError> {
    let value = decap_value(gue_port);
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
            set.insert(VipKey::new(*vip, 0, 0), value, 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decap_value_is_the_port_as_the_wire_holds_it() {
        assert_eq!(decap_value(None), 0);
        let v = decap_value(Some(DEFAULT_GUE_PORT));
        // The UDP header's destination port field, read as a native u16, widened.
        assert_eq!(v, u32::from(u16::from_ne_bytes(6080u16.to_be_bytes())));
        assert_eq!((v as u16).to_ne_bytes(), [0x17, 0xc0]);
        assert_ne!(
            decap_value(Some(1)),
            0,
            "any real port is told apart from IPIP only"
        );
    }
}
