//! The README says what the binary does: its "Using it" block names every
//! command of `livelock --help` (and no other), every flag it shows exists in
//! that command's `--help`, and the settings table lists every flag of
//! `livelock server --help` with the variable the help names (issue 11,
//! items 11 and "README's CLI section and `livelock --help` say the same
//! thing"). The C example's output is pinned in tests/c_example.rs, the
//! protocol's INSPECT example in src/wire/protocol.rs.

mod common;

use std::collections::BTreeSet;

use common::livelock_bin;

const README: &str = include_str!("../README.md");

fn help(args: &[&str]) -> String {
    let output = livelock_bin()
        .args(args)
        .arg("--help")
        .output()
        .expect("run livelock --help");
    assert!(output.status.success(), "livelock {args:?} --help failed");
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// The first ```sh block of the README's "Using it" section.
fn usage_block() -> &'static str {
    let section = &README[README.find("## Using it").expect("a Using it section")..];
    let block = &section[section.find("```sh").expect("a sh block") + 5..];
    &block[..block.find("```").expect("its end")]
}

/// The commands listed under "Commands:" in `livelock --help`.
fn commands_in_help() -> BTreeSet<String> {
    let text = help(&[]);
    let list = &text[text.find("Commands:").expect("a command list")..];
    list.lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Flags (`-w`, `--json`) written in `text` outside comments.
fn flags_in(text: &str) -> BTreeSet<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| "[]|(),'".contains(c)))
        .filter(|w| w.starts_with('-') && w.len() > 1 && w != &"--")
        .map(|w| w.split('=').next().unwrap_or(w).to_string())
        .collect()
}

#[test]
fn the_usage_block_names_every_command_and_real_flags() {
    let mut in_readme = BTreeSet::new();
    for line in usage_block().lines() {
        let code = line.split('#').next().unwrap_or("");
        let mut words = code.split_whitespace();
        if words.next() != Some("livelock") {
            continue;
        }
        let command = words.next().expect("a command").to_string();
        // A command with subcommands (`cluster status`): the subcommand's help.
        let mut path = vec![command.as_str()];
        let sub = words.next().unwrap_or("");
        if help(&[&command]).contains(&format!("\n  {sub} ")) {
            path.push(sub);
        }
        let help = help(&path);
        for flag in flags_in(code) {
            // `-w 30s` in the README: `-w, --wait` in the help.
            let written = help.contains(&format!("{flag} ")) || help.contains(&format!("{flag},"));
            assert!(
                written,
                "README shows `livelock {command} {flag}`, which --help does not have"
            );
        }
        in_readme.insert(command);
    }
    assert_eq!(
        in_readme,
        commands_in_help(),
        "the README's usage block and `livelock --help` list the same commands"
    );
}

#[test]
fn the_settings_table_lists_every_server_flag_and_its_variable() {
    let section = &README[README.find("## Settings").expect("a Settings section")..];
    let table: Vec<&str> = section
        .lines()
        .skip_while(|l| !l.starts_with("| flag"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(table.len() > 10, "the settings table");
    let help = help(&["server"]);
    for line in help.lines().map(str::trim_start) {
        let Some(flag) = line
            .strip_prefix("--")
            .and_then(|l| l.split([' ', '<']).next())
        else {
            continue;
        };
        if flag == "help" {
            continue;
        }
        let row = table
            .iter()
            .find(|row| row.starts_with(&format!("| `--{flag}")))
            .unwrap_or_else(|| panic!("--{flag} is not in the README's settings table"));
        // A variable the help names for this flag is in its row.
        // (The entry's own line: another flag's text may name this one.)
        let at = help
            .find(&format!("\n      --{flag}"))
            .or_else(|| help.find(&format!(", --{flag}")))
            .expect("the flag's entry");
        let entry = &help[at..];
        let entry = &entry[..entry[2..].find("\n  -").map_or(entry.len(), |e| e + 2)];
        if let Some(env) = entry.split("[env: ").nth(1) {
            let variable = env.split([']', '=', ',']).next().unwrap_or("").trim();
            assert!(
                row.contains(variable),
                "--{flag}: the help names {variable}, the README row does not: {row}"
            );
        }
    }
}
