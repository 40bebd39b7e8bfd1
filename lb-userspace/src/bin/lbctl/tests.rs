//! Argument parsing and the commands' output, without a running lbd.

use clap::{CommandFactory as _, error::ErrorKind};

use super::*;

fn parse(line: &str) -> Result<Args, clap::Error> {
    Args::try_parse_from(line.split_whitespace())
}

fn error(line: &str) -> String {
    parse(line).expect_err(line).render().to_string()
}

#[test]
fn definition_is_consistent() {
    Args::command().debug_assert();
}

#[test]
#[allow(clippy::too_many_lines)] // one table of every command line and what it parses to
fn every_command_parses() {
    let vip: VipId = "10.0.0.1:80/tcp".parse().unwrap();
    let addr: IpAddr = "10.1.0.1".parse().unwrap();
    let cases: Vec<(&str, Command)> = vec![
        (
            "lbctl vip add 10.0.0.1:80/tcp --ring-size 251 --hash src-ip",
            Command::Vip(VipCommand::Add {
                vip,
                ring_size: Some(251),
                hash: Some(HashMode::SrcIp),
                encap: None,
                check: CheckArgs::default(),
            }),
        ),
        (
            "lbctl vip add 10.0.0.1:80/tcp",
            Command::Vip(VipCommand::Add {
                vip,
                ring_size: None,
                hash: None,
                encap: None,
                check: CheckArgs::default(),
            }),
        ),
        (
            "lbctl vip add [2001:db8::1]:443/tcp --encap gue",
            Command::Vip(VipCommand::Add {
                vip: "[2001:db8::1]:443/tcp".parse().unwrap(),
                ring_size: None,
                hash: None,
                encap: Some(Encap::Gue),
                check: CheckArgs::default(),
            }),
        ),
        (
            "lbctl vip set [2001:db8::1]:443/tcp --encap ipip",
            Command::Vip(VipCommand::Set {
                vip: "[2001:db8::1]:443/tcp".parse().unwrap(),
                ring_size: None,
                hash: None,
                encap: Some(Encap::Ipip),
            }),
        ),
        (
            "lbctl backend add [2001:db8::1]:443/tcp 10.1.0.1",
            Command::Backend(BackendCommand::Add {
                vip: "[2001:db8::1]:443/tcp".parse().unwrap(),
                addr,
                weight: None,
                check: CheckArgs::default(),
            }),
        ),
        (
            "lbctl vip del 10.0.0.1:80/tcp",
            Command::Vip(VipCommand::Del { vip }),
        ),
        ("lbctl vip list", Command::Vip(VipCommand::List)),
        (
            "lbctl backend add 10.0.0.1:80/tcp 10.1.0.1 --weight 70000",
            Command::Backend(BackendCommand::Add {
                vip,
                addr,
                weight: Some(70_000),
                check: CheckArgs::default(),
            }),
        ),
        (
            "lbctl backend add 10.0.0.1:80/tcp 10.1.0.1 --check http:/healthz --interval 1s --rise 2 --fall 3",
            Command::Backend(BackendCommand::Add {
                vip,
                addr,
                weight: None,
                check: CheckArgs {
                    check: Some(CheckKind::Http {
                        path: "/healthz".into(),
                    }),
                    interval: Some(Span(Duration::from_secs(1))),
                    rise: Some(2),
                    fall: Some(3),
                    ..CheckArgs::default()
                },
            }),
        ),
        (
            "lbctl backend check 10.0.0.1:80/tcp 10.1.0.1 --clear",
            Command::Backend(BackendCommand::Check {
                vip,
                addr,
                check: CheckArgs::default(),
                clear: true,
            }),
        ),
        (
            "lbctl vip check 10.0.0.1:80/tcp --check tcp --check-port 8080 --via-tunnel",
            Command::Vip(VipCommand::Check {
                vip,
                check: CheckArgs {
                    check: Some(CheckKind::Tcp),
                    check_port: Some(8080),
                    via_tunnel: true,
                    ..CheckArgs::default()
                },
                clear: false,
            }),
        ),
        (
            "lbctl backend del 10.0.0.1:80/tcp 10.1.0.1",
            Command::Backend(BackendCommand::Del { vip, addr }),
        ),
        (
            "lbctl backend weight 10.0.0.1:80/tcp 10.1.0.1 50",
            Command::Backend(BackendCommand::Weight {
                vip,
                addr,
                weight: 50,
            }),
        ),
        (
            "lbctl backend drain 10.0.0.1:80/tcp 10.1.0.1",
            Command::Backend(BackendCommand::Drain {
                vip,
                addr,
                wait: false,
                timeout: 300,
                idle_timeout: 60,
            }),
        ),
        (
            "lbctl backend drain 10.0.0.1:80/tcp 10.1.0.1 --wait --timeout 5 --idle-timeout 2",
            Command::Backend(BackendCommand::Drain {
                vip,
                addr,
                wait: true,
                timeout: 5,
                idle_timeout: 2,
            }),
        ),
        (
            "lbctl backend undrain 10.0.0.1:80/tcp 10.1.0.1",
            Command::Backend(BackendCommand::Undrain { vip, addr }),
        ),
        ("lbctl status", Command::Status { idle_timeout: None }),
        (
            "lbctl status --idle-timeout 5",
            Command::Status {
                idle_timeout: Some(5),
            },
        ),
        (
            "lbctl apply -f lb.toml --dry-run",
            Command::Apply {
                file: "lb.toml".into(),
                dry_run: true,
            },
        ),
        (
            "lbctl apply --file lb.toml",
            Command::Apply {
                file: "lb.toml".into(),
                dry_run: false,
            },
        ),
        ("lbctl export", Command::Export),
        (
            "lbctl stats",
            Command::Stats {
                idle_timeout: None,
                watch: false,
                interval: Duration::from_secs(1),
                count: None,
            },
        ),
        (
            "lbctl stats --watch --interval 0.5 --count 3 --idle-timeout 5",
            Command::Stats {
                idle_timeout: Some(5),
                watch: true,
                interval: Duration::from_millis(500),
                count: Some(3),
            },
        ),
        (
            "lbctl stats --interval 2",
            Command::Stats {
                idle_timeout: None,
                watch: false,
                interval: Duration::from_secs(2),
                count: None,
            },
        ),
        (
            "lbctl debug on",
            Command::Debug {
                switch: DebugSwitch::On,
            },
        ),
        (
            "lbctl debug off",
            Command::Debug {
                switch: DebugSwitch::Off,
            },
        ),
        (
            "lbctl debug status",
            Command::Debug {
                switch: DebugSwitch::Status,
            },
        ),
    ];
    for (line, want) in cases {
        let args = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        // The derive's Debug is the simplest structural comparison of the parsed command.
        assert_eq!(format!("{:?}", args.command), format!("{want:?}"), "{line}");
        assert!(!args.json);
        assert_eq!(args.socket, None);
    }
}

#[test]
fn global_flags_go_anywhere() {
    for line in [
        "lbctl --json --socket /tmp/x.sock status",
        "lbctl status --json --socket /tmp/x.sock",
        "lbctl backend --socket /tmp/x.sock del 10.0.0.1:80/tcp 10.1.0.1 --json",
    ] {
        let args = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(args.json, "{line}");
        assert_eq!(args.socket, Some("/tmp/x.sock".into()), "{line}");
    }
    // The flag wins over the environment, which wins over the default (the environment
    // itself is not touched here: tests run in parallel).
    assert_eq!(socket_path(Some("/a".into())), PathBuf::from("/a"));
}

#[test]
fn bad_values_name_the_argument() {
    for (line, want) in [
        (
            "lbctl vip add 10.0.0.1:80",
            "invalid value '10.0.0.1:80' for '<VIP>': \"10.0.0.1:80\" is not a valid VIP: expected \"address:port/protocol\"",
        ),
        (
            "lbctl vip del 10.0.0.1:80/sctp",
            "for '<VIP>': \"10.0.0.1:80/sctp\" is not a valid VIP: the protocol must be \"tcp\" or \"udp\"",
        ),
        (
            "lbctl backend add 10.0.0.1:80/tcp 10.1.0",
            "invalid value '10.1.0' for '<ADDR>': invalid IP address syntax",
        ),
        (
            "lbctl backend weight 10.0.0.1:80/tcp 10.1.0.1 -1",
            "unexpected argument '-1'",
        ),
        (
            "lbctl backend weight 10.0.0.1:80/tcp 10.1.0.1 heavy",
            "invalid value 'heavy' for '<W>'",
        ),
        (
            "lbctl vip add 10.0.0.1:80/tcp --hash 5-tuple",
            "invalid value '5-tuple' for '--hash <MODE>': \"5-tuple\" is not a valid hash mode",
        ),
        (
            "lbctl vip add 10.0.0.1:80/tcp --encap vxlan",
            "invalid value 'vxlan' for '--encap <KIND>': \"vxlan\" is not a valid encapsulation",
        ),
        (
            "lbctl backend drain 10.0.0.1:80/tcp 10.1.0.1 --timeout 5",
            "the following required arguments were not provided:\n  --wait",
        ),
        (
            "lbctl stats --count 2",
            "the following required arguments were not provided:\n  --watch",
        ),
        (
            "lbctl stats --watch --count 0",
            "invalid value '0' for '--count <N>'",
        ),
        (
            "lbctl stats --interval 0.05",
            "invalid value '0.05' for '--interval <SECS>': \"0.05\" is too short: at least 0.1 s",
        ),
        (
            "lbctl stats --interval soon",
            "invalid value 'soon' for '--interval <SECS>': \"soon\" is not a number of seconds",
        ),
        ("lbctl stats --interval -1", "unexpected argument '-1'"),
        (
            "lbctl stats --interval inf",
            "invalid value 'inf' for '--interval <SECS>': \"inf\" is not a number of seconds",
        ),
        ("lbctl debug maybe", "invalid value 'maybe' for '<SWITCH>'"),
    ] {
        let e = error(line);
        assert!(e.contains(want), "{line}:\ngot  {e}\nwant {want}");
    }
    for (line, kind) in [
        ("lbctl", ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand),
        (
            "lbctl vip",
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
        ),
        (
            "lbctl backend add 10.0.0.1:80/tcp",
            ErrorKind::MissingRequiredArgument,
        ),
        ("lbctl apply", ErrorKind::MissingRequiredArgument),
        ("lbctl export extra", ErrorKind::UnknownArgument),
        ("lbctl debug", ErrorKind::MissingRequiredArgument),
    ] {
        assert_eq!(parse(line).expect_err(line).kind(), kind, "{line}");
    }
}
