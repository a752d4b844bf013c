fn main() {
    sd_build::link_libtorch();
}
