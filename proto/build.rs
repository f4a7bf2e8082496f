//! Generates the control API (pinkeeper/v1/control.proto): prost 0.13 messages and
//! async ttrpc client and server, kept in this crate apart from
//! containerd-client's prost 0.14 types (FACTS.md section 5).

fn main() {
    println!("cargo:rerun-if-changed=pinkeeper/v1/control.proto");
    let out_dir = match std::env::var("OUT_DIR") {
        Ok(dir) => dir,
        Err(_) => panic!("cargo sets OUT_DIR for build scripts"),
    };
    let result = ttrpc_codegen_prost::Codegen::new()
        .out_dir(out_dir)
        .input("pinkeeper/v1/control.proto")
        .include(".")
        .prost()
        .customize(ttrpc_codegen_prost::Customize {
            async_all: true,
            gen_mod: true,
            serde: true,
            ..Default::default()
        })
        .run();
    if let Err(e) = result {
        panic!(
            "cannot generate the control API from pinkeeper/v1/control.proto: {e} \
             (is protoc installed? `make deps` installs Debian's protobuf-compiler)"
        );
    }
}
