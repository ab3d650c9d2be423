//! ip2p-vae
