//! The veths of the agent's network namespace whose peer lives in another namespace (pods, backend
//! namespaces), read from the kernel with one `RTM_GETLINK` dump: `lb_tc` hands packets for them
//! to the peer's ingress with `bpf_redirect_peer` (map `PEER_VETHS`). The kernel drops a peer
//! redirect to a device without a peer or with its peer in the same namespace, so only devices this
//! dump names get one; every other next hop takes `bpf_redirect`.

use std::{collections::BTreeSet, io, mem::size_of};

use anyhow::{ensure, Context, Result};

/// `IFLA_LINKINFO` (nested) and its `IFLA_INFO_KIND` (the link type, "veth").
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// `IFLA_LINK_NETNSID`: present when the link's other end (a veth's peer) is in another namespace.
const IFLA_LINK_NETNSID: u16 = 37;
/// Netlink attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Ifindexes of the veths of this namespace whose peer is in another namespace.
pub fn peer_veths() -> Result<BTreeSet<u32>> {
    // SAFETY: plain socket call; the descriptor is owned (and closed) by `fd` below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    ensure!(raw >= 0, "netlink socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);

    // struct nlmsghdr + struct ifinfomsg (16 bytes, all zero: every family, every link).
    let len = size_of::<libc::nlmsghdr>() + 16;
    let mut request = vec![0u8; len];
    request[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: sends `request`, a valid buffer of its length, to the kernel (a zeroed sockaddr_nl).
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd,
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    ensure!(
        sent == len as isize,
        "netlink RTM_GETLINK: {}",
        io::Error::last_os_error()
    );

    let mut found = BTreeSet::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receives into `buf`, a valid buffer of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        ensure!(n >= 0, "netlink recv: {}", io::Error::last_os_error());
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= size_of::<libc::nlmsghdr>() {
            let msg_len = u32::from_ne_bytes(msgs[0..4].try_into()?) as usize;
            let msg_type = u16::from_ne_bytes(msgs[4..6].try_into()?);
            ensure!(
                msg_len >= size_of::<libc::nlmsghdr>() && msg_len <= msgs.len(),
                "netlink: truncated message"
            );
            match i32::from(msg_type) {
                libc::NLMSG_DONE => return Ok(found),
                libc::NLMSG_ERROR => {
                    let errno = msgs
                        .get(16..20)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                        .unwrap_or(0);
                    return Err(io::Error::from_raw_os_error(-errno))
                        .context("netlink RTM_GETLINK dump");
                }
                _ if msg_type == libc::RTM_NEWLINK => {
                    if let Some(ifindex) = veth_with_foreign_peer(&msgs[16..msg_len]) {
                        found.insert(ifindex);
                    }
                }
                _ => {}
            }
            msgs = &msgs[align4(msg_len).min(msgs.len())..];
        }
    }
}

/// The ifindex of an `RTM_NEWLINK` payload (`ifinfomsg` + attributes) that is a veth with a peer
/// in another namespace.
fn veth_with_foreign_peer(payload: &[u8]) -> Option<u32> {
    let ifindex = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let attrs = attributes(payload.get(16..)?);
    let veth = attrs
        .iter()
        .find(|(t, _)| *t == IFLA_LINKINFO)
        .map(|(_, info)| {
            attributes(info).iter().any(|(t, kind)| {
                *t == IFLA_INFO_KIND && kind.split(|b| *b == 0).next() == Some(b"veth")
            })
        })
        .unwrap_or(false);
    let foreign_peer = attrs.iter().any(|(t, _)| *t == IFLA_LINK_NETNSID);
    (veth && foreign_peer).then_some(ifindex)
}

/// The (type, value) pairs of a run of netlink attributes; a malformed tail ends the list.
fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[align4(len).min(data.len())..];
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}
