// Package overlay reads and writes VM overlays: the file that carries a custom
// VM as the difference from a base VM.
//
// An overlay is one file: a fixed header, a compressed manifest that says
// where every chunk of the custom disk and memory images comes from, the
// compressed QEMU device state, an optional vm.json, and then the segments
// that hold the chunks no base can supply, in stream order. docs/FORMAT.md
// specifies the bytes. Build writes an overlay from a base and a custom VM;
// Open and Extract read one back. The package knows nothing of FUSE or HTTP:
// it works on io.ReaderAt and files, so the mount and the fetcher can reuse
// its decoding and verification.
package overlay
