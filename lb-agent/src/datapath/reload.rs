//! Reloading the balancer's programs while the agent runs, with other load-time settings
//! ([`ProgramSettings`]: flow events, the CIDR deny check), as a restarted agent does, without the
//! restart: the object is loaded again on the pinned maps, its programs are put into every pinned
//! link with `BPF_LINK_UPDATE` (the kernel swaps the program atomically: each packet runs the old
//! program or the new one, never none), and the program pins are replaced.
//!
//! Nothing the packets depend on changes hands: every map is the pinned one (connection tracking,
//! NAT state, services, backends, Maglev tables, counters), except the address prefilter, a data
//! section each load creates anew (see `crate::prefilter`). Its words are copied from the running
//! load's before any new program is attached, and the agent, which holds the datapath exclusively
//! while it reloads, writes the new copy from then on. A failure before the last link is updated
//! puts the old programs back into the links already updated and keeps the old load.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        SchedClassifier, Xdp,
    },
    Ebpf,
};
use lb_common::prefilter;
use tracing::{info, warn};

use super::{
    new_loader, Attachment, Datapath, ProgramSettings, EBPF_OBJECT, HOOKS, TC_PROGRAM, XDP_PROGRAM,
};
use crate::{pins, prefilter::AddressFilter};

/// A pinned link and the program of the object it runs.
struct LinkPin {
    path: PathBuf,
    program: &'static str,
}

impl Datapath {
    /// The load-time settings the programs run with.
    pub fn settings(&self) -> ProgramSettings {
        self.settings
    }

    /// Loads the programs again with `settings` and swaps them into every pinned link (see the
    /// module documentation); `Ok(false)` when the programs already run with them. Needs a pin
    /// directory (the maps are found through it) and refuses interfaces attached without one.
    /// On error the running programs and maps stay as they were.
    pub fn reload(&mut self, settings: ProgramSettings) -> Result<bool> {
        if settings == self.settings {
            return Ok(false);
        }
        let pins = self
            .pins
            .clone()
            .context("reloading the programs needs a pin directory (--bpffs-dir)")?;
        ensure!(
            self.resize.is_none(),
            "reloading the programs: a resize of the pinned maps is not finished"
        );
        if self
            .attached
            .iter()
            .any(|(_, a)| !matches!(a, Attachment::Pinned))
        {
            bail!("reloading the programs: an interface is attached without a pinned link");
        }
        let links = self.pinned_links(&pins);

        let map_pins: Vec<(String, PathBuf)> = pins::object_maps(EBPF_OBJECT, &self.max_entries)?
            .into_iter()
            .map(|(name, _)| {
                let path = pins.map(&name);
                (name, path)
            })
            .collect();
        let globals = settings.globals();
        let mut loader = new_loader(&globals, &self.max_entries);
        for (name, path) in &map_pins {
            // A map created here instead of adopted would start empty under running flows.
            ensure!(
                path.exists(),
                "reloading the programs: map {name} is not pinned ({} missing)",
                path.display()
            );
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("reloading the eBPF object")?;
        copy_address_filter(&self.ebpf, &mut ebpf)?;
        // The programs the running load has loaded (lb_xdp always; the TC ones once attached).
        let mut programs = vec![XDP_PROGRAM];
        for name in [TC_PROGRAM]
            .into_iter()
            .chain(HOOKS.map(|(name, _, _)| name))
        {
            if self.ebpf.program(name).is_some_and(|p| p.fd().is_ok()) {
                programs.push(name);
            }
        }
        for name in &programs {
            load_program(&mut ebpf, name)?;
        }

        for (done, link) in links.iter().enumerate() {
            if let Err(err) = put_into_link(&mut ebpf, link) {
                for link in &links[..done] {
                    if let Err(undo) = put_into_link(&mut self.ebpf, link) {
                        warn!(link = %link.path.display(), error = %format!("{undo:#}"),
                              "reload failed: the old program could not be put back");
                    }
                }
                return Err(err).context("reloading the programs");
            }
        }

        // Every link runs the new programs: their pins and the filter's follow.
        for name in &programs {
            let path = pins.program(name);
            pins::remove_if_present(&path)?;
            ebpf.program_mut(name)
                .context("program of the object")?
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        let filter = pins.map(AddressFilter::PIN_NAME);
        pins::remove_if_present(&filter)?;
        ebpf.map(AddressFilter::MAP)
            .context("address filter map")?
            .pin(&filter)
            .with_context(|| format!("pinning {}", filter.display()))?;
        self.ebpf = ebpf;
        info!(
            flow_events = settings.flow_events,
            cidr_deny = settings.cidr_deny,
            links = links.len(),
            "programs reloaded into the pinned links"
        );
        self.settings = settings;
        Ok(true)
    }

    /// The pinned links of the interfaces this datapath attached, and their programs.
    fn pinned_links(&self, pins: &pins::PinDir) -> Vec<LinkPin> {
        let mut interfaces: Vec<&str> = self.attached.iter().map(|(i, _)| i.as_str()).collect();
        interfaces.sort();
        interfaces.dedup();
        let mut links = Vec::new();
        for interface in interfaces {
            let candidates = [
                (pins.link(interface), XDP_PROGRAM),
                (pins.tc_ingress_link(interface), TC_PROGRAM),
            ]
            .into_iter()
            .chain(HOOKS.map(|(name, _, _)| (pins.tc_hook_link(interface, name), name)));
            for (path, program) in candidates {
                if path.exists() {
                    links.push(LinkPin { path, program });
                }
            }
        }
        links
    }
}

/// Copies the running load's address filter into the new load's, before any of its programs runs.
fn copy_address_filter(running: &Ebpf, new: &mut Ebpf) -> Result<()> {
    let words = AddressFilter::read(&Array::<&MapData, prefilter::Words>::try_from(
        running
            .map(AddressFilter::MAP)
            .context("address filter map")?,
    )?)?;
    let mut map: Array<&mut MapData, prefilter::Words> = Array::try_from(
        new.map_mut(AddressFilter::MAP)
            .context("address filter map")?,
    )?;
    words.write(&mut map)
}

/// Loads program `name` of `ebpf` (the verifier runs here).
fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the object"))?;
    let loaded = if name == XDP_PROGRAM {
        <&mut Xdp>::try_from(program)?.load()
    } else {
        <&mut SchedClassifier>::try_from(program)?.load()
    };
    loaded.with_context(|| format!("loading {name} (verifier)"))
}

/// Puts `link.program` of `ebpf` into the pinned link (`BPF_LINK_UPDATE`).
fn put_into_link(ebpf: &mut Ebpf, link: &LinkPin) -> Result<()> {
    let fd: FdLink = PinnedLink::from_pin(&link.path)
        .with_context(|| format!("opening {}", link.path.display()))?
        .into();
    let program = ebpf
        .program_mut(link.program)
        .with_context(|| format!("{} missing from the object", link.program))?;
    let updated = if link.program == XDP_PROGRAM {
        let program = <&mut Xdp>::try_from(program)?;
        let id = program.attach_to_link(XdpLink::try_from(fd)?)?;
        // The pin keeps the link; dropping our descriptor does not detach it.
        program.take_link(id).map(drop)
    } else {
        let program = <&mut SchedClassifier>::try_from(program)?;
        let id = program.attach_to_link(SchedClassifierLink::try_from(fd)?)?;
        program.take_link(id).map(drop)
    };
    updated.with_context(|| format!("replacing the program in {}", link.path.display()))
}
