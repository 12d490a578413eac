// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of the daemon (rust-vmm vhost-device style). External
//! checks rely on these option names: keep them stable.

use std::{path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use viommu::{
    config::{parse_domain_range, ConfigError},
    DeviceConfig, EndpointSet,
};

use crate::backend::BackendOptions;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
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
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|e| format!("`{s}`: {e}"))
}

fn parse_endpoints(s: &str) -> Result<EndpointSet, ConfigError> {
    s.parse()
}

fn parse_domains(s: &str) -> Result<(u32, u32), ConfigError> {
    parse_domain_range(s)
}

impl DaemonArgs {
    /// The device configuration these arguments describe, validated.
    pub fn device_config(&self) -> Result<DeviceConfig, ConfigError> {
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
            ..DeviceConfig::default()
        };
        config.validate()?;
        Ok(config)
    }

    pub fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            poll: Duration::from_micros(self.poll_us),
            client_timeout: Duration::from_millis(self.client_timeout_ms),
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
        assert_eq!(cli.daemon.backend_options().poll, Duration::from_micros(50));
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
}
