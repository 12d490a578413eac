// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of the daemon (rust-vmm vhost-device style). External
//! checks rely on these option names: keep them stable.

use std::{path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;
use viommu::{
    config::{parse_domain_range, ConfigError},
    parse::{parse_u32, parse_u64},
    prq::Limits,
    wire::{VIRTIO_IOMMU_RESV_MEM_T_MSI, VIRTIO_IOMMU_RESV_MEM_T_RESERVED},
    DeviceConfig, EndpointSet, HostConstraints, ReservedRegion, TableFormats,
};

use crate::{error::WithCauses, iommu::IommuOptions};

/// A command line that does not describe a usable daemon.
#[derive(Debug, Error)]
pub enum ArgsError {
    /// The device options are inconsistent.
    #[error("invalid device configuration")]
    Config(#[from] ConfigError),
    /// Neither --socket-path nor --socket-fd.
    #[error("--socket-path or --socket-fd is required")]
    NoSocket,
    /// `--socket-fd` is not an open socket.
    #[error("--socket-fd {0} is not an open socket")]
    NotASocket(i32),
    /// The VM id cannot be derived; `--vm-id` must be given.
    #[error("--vm-id is required: {0}")]
    NeedVmId(String),
    /// `--host-constraints` the device cannot take.
    #[error("--host-constraints of endpoint {endpoint}")]
    HostConstraints {
        /// The endpoint.
        endpoint: u32,
        /// Why.
        #[source]
        source: viommu::HostConstraintError,
    },
    /// The socket path cannot be made absolute.
    #[error("cannot make {path} absolute")]
    Absolute {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Parser)]
#[command(
    name = "vhost-device-iommu",
    version,
    about = "vhost-user virtio-iommu device daemon",
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect a running daemon through its control socket.
    Ctl(crate::ctl::CtlArgs),
    /// Write an ACPI VIOT table (for QEMU's `-acpitable file=`) describing
    /// the virtio-iommu PCI function and the endpoints it translates.
    Viot(crate::viot::ViotArgs),
    /// Inspect and clean up the host-wide PASID state directory.
    PasidAdmin(crate::pasid_admin::AdminArgs),
}

/// How guest PASIDs become host PASIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PasidMode {
    /// Host-wide PASIDs (VT-d shared work queues, ENQCMD): guest PASIDs
    /// come from the host allocator shared by every daemon of the host.
    Global,
    /// Per-device PASIDs (SMMUv3): guest PASIDs are used as host PASIDs,
    /// only checked against the device's PASID width.
    Identity,
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

impl From<OnOff> for bool {
    fn from(v: OnOff) -> bool {
        v == OnOff::On
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("socket").required(true).args(["socket_path", "socket_fd"])))]
pub struct DaemonArgs {
    /// Unix socket the VMM (vhost-user frontend) connects to.
    #[arg(short = 's', long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Listening socket already bound and passed in by a service manager.
    #[arg(long, value_name = "FD")]
    pub socket_fd: Option<i32>,

    /// Endpoint IDs that exist: comma-separated IDs or inclusive ranges,
    /// decimal or hex (`0x20-0x27,5`). Default: every 16-bit PCI RID.
    #[arg(long, value_name = "LIST", value_parser = parse_endpoints)]
    pub endpoints: Option<EndpointSet>,

    /// Supported page sizes; the lowest set bit is the mapping granule.
    #[arg(long, value_name = "MASK", default_value = "0xfffffffffffff000", value_parser = parse_u64)]
    pub page_size_mask: u64,

    /// Width of the IOVA space: input_range = [0, 2^N - 1].
    #[arg(long, value_name = "N", default_value_t = 48)]
    pub input_range_bits: u32,

    /// Valid domain IDs, inclusive (`A-B`).
    #[arg(long, value_name = "A-B", default_value = "0-0xffffffff", value_parser = parse_domains)]
    pub domain_range: (u32, u32),

    /// Size of the PROBE properties area in bytes; 0 disables PROBE.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub probe_size: u32,

    /// What the host IOMMU imposes on a passed-through endpoint, for
    /// static setups (a VMM can send it over the control socket
    /// instead): `EP=ITEM[,ITEM...]`, ITEM being `START-END` (IOVAs the
    /// host cannot map: reported in that endpoint's PROBE), `msi:START-END`
    /// (its MSI window, when the device reports none) or `pgsizes:MASK`
    /// (host page sizes: narrows --page-size-mask). Repeatable.
    #[arg(long, value_name = "EP=ITEMS", value_parser = parse_host_constraints)]
    pub host_constraints: Vec<(u32, HostConstraints)>,

    /// Initial value of the `bypass` config field: whether endpoints that
    /// are not attached to a domain bypass the IOMMU.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub boot_bypass: OnOff,

    /// Offer VIRTIO_IOMMU_F_BYPASS_CONFIG (the `bypass` field and bypass
    /// domains). Without it unattached endpoints are blocked.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub bypass_config: OnOff,

    /// After a batch of requests, keep checking the request queue for this
    /// many microseconds before sleeping; 0 turns polling off.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub poll_us: u64,

    /// Unix socket of the control plane (translations, events, `ctl`),
    /// created mode 0600; only the daemon's uid and root may connect.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// How long a control client may take to acknowledge an invalidation
    /// before it is disconnected (the guest's UNMAP then completes).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub client_timeout_ms: u64,

    /// Most domains that may exist at once.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_domains: usize,

    /// Most mappings one domain may hold.
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_mappings: usize,

    /// Name of this VM's PASID set in the host-wide allocator. A daemon
    /// restarted with the same name recovers its PASIDs; two running
    /// daemons cannot share one. Default: the absolute --socket-path (or
    /// the path the --socket-fd socket is bound to).
    #[arg(long, value_name = "NAME")]
    pub vm_id: Option<String>,

    /// Host PASID width: PASIDs live in [1, 2^N - 1].
    #[arg(long, value_name = "N", default_value_t = viommu::pasid::DEFAULT_BITS,
          value_parser = clap::value_parser!(u8).range(1..=20))]
    pub pasid_bits: u8,

    /// Most PASIDs this VM may hold at once; 0 disables PASIDs.
    #[arg(long, value_name = "N", default_value_t = viommu::pasid::DEFAULT_SET_QUOTA)]
    pub pasid_quota: u32,

    /// global: guest PASIDs come from the host-wide pool (PASID_ALLOC is
    /// offered); identity: guest PASIDs are host PASIDs (per-device PASID
    /// platforms).
    #[arg(long, value_name = "global|identity", default_value = "global")]
    pub pasid_mode: PasidMode,

    /// Guest table formats ATTACH_TABLE accepts (PROJECT EXTENSION):
    /// `vtd` (x86-64 first-stage tables), `smmuv3` (Arm context-descriptor
    /// tables), both comma-separated, or `none` (the feature is not
    /// offered). Mainline guests never see the difference.
    #[arg(long, value_name = "LIST", default_value = "vtd,smmuv3", value_parser = parse_formats)]
    pub table_formats: TableFormats,

    /// Guest-physical address width tables are walked with (PROBE
    /// OUTPUT_SIZE): table entries with address bits above it fault.
    #[arg(long, value_name = "N", default_value_t = 48)]
    pub output_bits: u8,

    /// Most PASID table bindings one endpoint may hold.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_bindings: usize,

    /// Most table walks the daemon caches for control clients (0: none).
    #[arg(long, value_name = "N", default_value_t = 1 << 16)]
    pub max_cached_translations: usize,

    /// Offer page requests (PROJECT EXTENSION feature bit 10, with table
    /// formats): recoverable faults of device models and host fault
    /// queues reach the guest, which answers each group.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub page_requests: OnOff,

    /// How long the guest has to answer a page-request group before the
    /// device answers it INVALID (and its source may go on).
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub page_request_timeout_ms: u64,

    /// Most page-request groups one endpoint may have outstanding (PROBE
    /// PAGE_REQUEST's max_outstanding_groups); further groups are
    /// answered INVALID at once.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_page_requests: u32,

    /// Directory of the host-wide PASID state shared by all daemons.
    /// Default: /var/lib/vhost-device-iommu as root,
    /// $XDG_STATE_HOME/vhost-device-iommu (or ~/.local/state/...) otherwise.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// The path Unix socket `fd` is bound to, if any; `Err` if `fd` is not
/// a Unix socket.
fn bound_path(fd: i32) -> Result<Option<PathBuf>, ()> {
    let addr: nix::sys::socket::UnixAddr = nix::sys::socket::getsockname(fd).map_err(|_| ())?;
    Ok(addr.path().map(PathBuf::from))
}

fn parse_endpoints(s: &str) -> Result<EndpointSet, WithCauses<ConfigError>> {
    s.parse().map_err(WithCauses)
}

fn parse_domains(s: &str) -> Result<(u32, u32), WithCauses<ConfigError>> {
    parse_domain_range(s).map_err(WithCauses)
}

/// `EP=ITEM[,ITEM...]` (see `--host-constraints`).
fn parse_host_constraints(s: &str) -> Result<(u32, HostConstraints), String> {
    let (ep, items) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected ENDPOINT=ITEM[,ITEM...]"))?;
    let ep = parse_u32(ep).map_err(|e| format!("endpoint `{ep}`: {e}"))?;
    let mut c = HostConstraints::default();
    for item in items.split(',').map(str::trim) {
        if let Some(mask) = item.strip_prefix("pgsizes:") {
            c.page_size_mask = parse_u64(mask).map_err(|e| format!("`{item}`: {e}"))?;
            if c.page_size_mask == 0 {
                return Err(format!("`{item}`: no page size"));
            }
            continue;
        }
        let (subtype, range) = match item.strip_prefix("msi:") {
            Some(r) => (VIRTIO_IOMMU_RESV_MEM_T_MSI, r),
            None => (VIRTIO_IOMMU_RESV_MEM_T_RESERVED, item),
        };
        let (a, b) = range.split_once('-').ok_or_else(|| {
            format!("`{item}`: expected START-END, msi:START-END or pgsizes:MASK")
        })?;
        let start = parse_u64(a).map_err(|e| format!("`{item}`: {e}"))?;
        let end = parse_u64(b).map_err(|e| format!("`{item}`: {e}"))?;
        if start > end {
            return Err(format!("`{item}`: empty range"));
        }
        c.regions.push(ReservedRegion {
            start,
            end,
            subtype,
        });
    }
    Ok((ep, c))
}

fn parse_formats(s: &str) -> Result<TableFormats, ConfigError> {
    s.parse()
}

impl DaemonArgs {
    /// The device configuration these arguments describe, validated.
    pub fn device_config(&self) -> Result<DeviceConfig, ArgsError> {
        let config = DeviceConfig {
            page_size_mask: self.page_size_mask,
            input_range: DeviceConfig::input_range_from_bits(self.input_range_bits)?,
            domain_range: self.domain_range,
            probe_size: self.probe_size,
            boot_bypass: self.boot_bypass.into(),
            bypass_config: self.bypass_config.into(),
            endpoints: self
                .endpoints
                .clone()
                .unwrap_or_else(EndpointSet::all_pci_rids),
            max_domains: self.max_domains,
            max_mappings_per_domain: self.max_mappings,
            table_formats: self.table_formats,
            output_bits: self.output_bits,
            max_bindings_per_endpoint: self.max_bindings,
            page_requests: bool::from(self.page_requests).then(|| Limits {
                groups_per_endpoint: self.max_page_requests,
                groups_total: self.max_page_requests.saturating_mul(64).max(4096),
                response_timeout: Some(Duration::from_millis(self.page_request_timeout_ms)),
                ..Limits::default()
            }),
            ..DeviceConfig::default()
        };
        config.validate()?;
        // Checked here, before anything is created; the daemon applies
        // them to its device the same way.
        let mut scratch = viommu::Viommu::new(config.clone());
        for (endpoint, c) in &self.host_constraints {
            scratch
                .set_host_constraints(*endpoint, c)
                .map_err(|source| ArgsError::HostConstraints {
                    endpoint: *endpoint,
                    source,
                })?;
        }
        Ok(config)
    }

    /// Whether the host-wide PASID allocator is used (global mode with a
    /// non-zero quota).
    pub fn pasids_enabled(&self) -> bool {
        self.pasid_mode == PasidMode::Global && self.pasid_quota > 0
    }

    /// The VM id: `--vm-id`, else the absolute socket path (for
    /// `--socket-fd`, the path the socket is bound to).
    pub fn vm_id(&self) -> Result<String, ArgsError> {
        if let Some(id) = &self.vm_id {
            return Ok(id.clone());
        }
        let path = match (&self.socket_path, self.socket_fd) {
            (Some(p), _) => std::path::absolute(p).map_err(|source| ArgsError::Absolute {
                path: p.clone(),
                source,
            })?,
            (None, Some(fd)) => bound_path(fd)
                .map_err(|()| ArgsError::NotASocket(fd))?
                .ok_or_else(|| {
                    ArgsError::NeedVmId(format!("--socket-fd {fd} is not bound to a path"))
                })?,
            (None, None) => return Err(ArgsError::NoSocket),
        };
        path.to_str()
            .map(String::from)
            .ok_or_else(|| ArgsError::NeedVmId(format!("{} is not UTF-8", path.display())))
    }

    /// The runtime options of the IOMMU.
    pub fn iommu_options(&self) -> IommuOptions {
        IommuOptions {
            poll: Duration::from_micros(self.poll_us),
            client_timeout: Duration::from_millis(self.client_timeout_ms),
            cached_translations: self.max_cached_translations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vhost-device-iommu").chain(args.iter().copied()))
    }

    #[test]
    fn socket_path_or_fd_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--socket-path", "/tmp/x", "--socket-fd", "3"]).is_err());
        assert!(parse(&["--socket-fd", "3"]).is_ok());
    }

    #[test]
    fn options_of_the_cli_contract_parse() {
        let cli = parse(&[
            "--socket-path",
            "/tmp/v.sock",
            "--endpoints",
            "0x20-0x27,5",
            "--page-size-mask",
            "0x1000",
            "--input-range-bits",
            "39",
            "--domain-range",
            "1-0x100",
            "--probe-size",
            "256",
            "--boot-bypass",
            "off",
        ])
        .unwrap();
        let cfg = cli.daemon.device_config().unwrap();
        assert_eq!(cfg.page_size_mask, 0x1000);
        assert_eq!(cfg.input_range, (0, (1 << 39) - 1));
        assert_eq!(cfg.domain_range, (1, 0x100));
        assert_eq!(cfg.probe_size, 256);
        assert!(!cfg.boot_bypass);
        assert!(cfg.endpoints.contains(0x27) && cfg.endpoints.contains(5));
        assert!(!cfg.endpoints.contains(6));
    }

    #[test]
    fn defaults_match_the_documentation() {
        let cli = parse(&["--socket-path", "/tmp/v.sock"]).unwrap();
        let cfg = cli.daemon.device_config().unwrap();
        assert_eq!(cfg, DeviceConfig::default());
        assert_eq!(cli.daemon.iommu_options().poll, Duration::from_micros(50));
    }

    #[test]
    fn pasid_options_default_to_the_issue_values() {
        let cli = parse(&["--socket-path", "/tmp/v.sock"]).unwrap();
        let d = &cli.daemon;
        assert_eq!(
            (d.pasid_bits, d.pasid_quota, d.pasid_mode),
            (20, 1000, PasidMode::Global)
        );
        assert!(d.vm_id.is_none() && d.state_dir.is_none());
        assert!(d.pasids_enabled());
        let cli = parse(&["--socket-path", "x", "--pasid-quota", "0"]).unwrap();
        assert!(!cli.daemon.pasids_enabled(), "quota 0 disables PASIDs");
        let cli = parse(&["--socket-path", "x", "--pasid-mode", "identity"]).unwrap();
        assert!(!cli.daemon.pasids_enabled());
        for bad in ["0", "21"] {
            assert!(parse(&["--socket-path", "x", "--pasid-bits", bad]).is_err());
        }
    }

    #[test]
    fn vm_id_defaults_to_the_absolute_socket_path() {
        let cli = parse(&["--socket-path", "/run/vm1/iommu.sock"]).unwrap();
        assert_eq!(cli.daemon.vm_id().unwrap(), "/run/vm1/iommu.sock");
        let cli = parse(&["--socket-path", "rel.sock"]).unwrap();
        let id = cli.daemon.vm_id().unwrap();
        assert!(id.starts_with('/') && id.ends_with("/rel.sock"), "{id}");
        let cli = parse(&["--socket-path", "x", "--vm-id", "guest-7"]).unwrap();
        assert_eq!(cli.daemon.vm_id().unwrap(), "guest-7");
        // A listening socket passed by fd: its bound path.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l).to_string();
        let cli = parse(&["--socket-fd", &fd]).unwrap();
        assert_eq!(cli.daemon.vm_id().unwrap(), path.to_str().unwrap());
        let unbound = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&unbound).to_string();
        let cli = parse(&["--socket-fd", &fd]).unwrap();
        assert!(cli
            .daemon
            .vm_id()
            .unwrap_err()
            .to_string()
            .contains("--vm-id is required"));
        let cli = parse(&["--socket-fd", "999"]).unwrap();
        assert!(cli
            .daemon
            .vm_id()
            .unwrap_err()
            .to_string()
            .contains("not an open socket"));
    }

    #[test]
    fn bad_values_are_refused_with_a_message() {
        for bad in [
            &["--socket-path", "x", "--endpoints", "7-3"][..],
            &["--socket-path", "x", "--domain-range", "9-1"],
            &["--socket-path", "x", "--page-size-mask", "zz"],
            &["--socket-path", "x", "--boot-bypass", "maybe"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let cli = parse(&["--socket-path", "x", "--input-range-bits", "7"]).unwrap();
        assert!(cli.daemon.device_config().is_err());
        let cli = parse(&["--socket-path", "x", "--page-size-mask", "0"]).unwrap();
        assert!(cli.daemon.device_config().is_err());
    }

    #[test]
    fn cli_viot_subcommand_parses_and_keeps_daemon_options_out() {
        let cli = parse(&[
            "viot",
            "--iommu-bdf",
            "00:03.0",
            "--endpoints",
            "0000:00:04.0-00:04.7,00:05.0",
            "-o",
            "viot.bin",
        ])
        .unwrap();
        let Some(Command::Viot(args)) = cli.command else {
            panic!("no viot command: {cli:?}");
        };
        assert_eq!(args.iommu_bdf.rid(), 0x18);
        assert_eq!(args.endpoints.0.len(), 2);
        assert_eq!(args.output, std::path::PathBuf::from("viot.bin"));
        for bad in [
            &["viot", "--iommu-bdf", "00:03.0", "--endpoints", "00:04.0"][..],
            &[
                "viot",
                "--iommu-bdf",
                "00:3",
                "--endpoints",
                "00:04.0",
                "-o",
                "x",
            ],
            &[
                "viot",
                "--iommu-bdf",
                "00:03.0",
                "--endpoints",
                "00:04.7-00:04.0",
                "-o",
                "x",
            ],
            &[
                "--socket-path",
                "/tmp/s",
                "viot",
                "--iommu-bdf",
                "00:03.0",
                "--endpoints",
                "00:04.0",
                "-o",
                "x",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
