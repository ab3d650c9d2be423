//! `ip2p`: InstructPix2Pix from the terminal.

fn main() {
    println!("ip2p: subcommands arrive with their issues");
}
