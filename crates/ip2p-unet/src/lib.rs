//! ip2p-unet
