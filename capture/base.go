// Package capture is the customization journey: it boots a VM and saves it
// as a base (CreateBase), and it resumes a base from a mount of itself,
// lets it be customized, closes the semantic gap, saves it and builds the
// overlay of the result (Capture). It parses no flags; `base create` and
// `overlay capture` are its front ends, and the tests drive it through
// them.
package capture

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/store"
)

// ReadyFunc waits until the VM is ready to be saved: a console line, a
// delay, a key press.
type ReadyFunc func(ctx context.Context, vm *qemu.VM) error

// BaseOptions say what base to create.
type BaseOptions struct {
	StateDir string
	Name     string
	// Disk is booted from a copy: the file itself is never modified.
	// Kernel and Initrd, if set, are copied beside it.
	Disk, Kernel, Initrd string
	// Config is the virtual hardware; its Kernel and Initrd are set here.
	Config      qemu.Config
	QEMU, Accel string // checked and resolved
	Console     io.Writer
	Ready       ReadyFunc
	Log         zerolog.Logger
}

// CreateBase boots the VM with its RAM in a shared file, waits until it is
// ready, saves its device state and vm.json, and imports the result as a
// base in the registry. It returns the base and the directory in the
// state dir that holds its files. The registry is not held while the
// guest boots, so mounts can start meanwhile.
func CreateBase(ctx context.Context, opt BaseOptions) (_ *store.Base, dir string, err error) {
	st, err := store.Open(opt.StateDir, opt.Log)
	if err != nil {
		return nil, "", err
	}
	_, err = st.Resolve(opt.Name)
	st.Close()
	if err == nil {
		return nil, "", fmt.Errorf("a base named %q is already registered", opt.Name)
	}
	dir, err = os.MkdirTemp(st.Dir(), "base-"+opt.Name+"-*")
	if err != nil {
		return nil, "", err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	cfg := opt.Config
	if opt.Kernel != "" {
		cfg.Kernel = "vmlinuz"
		if err := copyFile(opt.Kernel, filepath.Join(dir, cfg.Kernel)); err != nil {
			return nil, "", err
		}
	}
	if opt.Initrd != "" {
		cfg.Initrd = "initrd.img"
		if err := copyFile(opt.Initrd, filepath.Join(dir, cfg.Initrd)); err != nil {
			return nil, "", err
		}
	}
	files := store.ImportFiles{Disk: filepath.Join(dir, "disk.img"), Memory: filepath.Join(dir, "memory.img"),
		State: filepath.Join(dir, "state"), VMConfig: filepath.Join(dir, "vm.json")}
	if err := copyFile(opt.Disk, files.Disk); err != nil {
		return nil, "", err
	}
	cj, _ := json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(files.VMConfig, append(cj, '\n'), 0o644); err != nil {
		return nil, "", err
	}
	qmp := filepath.Join(dir, "qmp.sock")
	args := cfg.Args(qemu.Run{Accel: opt.Accel, Memory: files.Memory, Share: true, Disk: files.Disk,
		QMP: qmp, Dir: dir, Boot: true})
	opt.Log.Info().Str("accel", opt.Accel).Msg("booting the base VM")
	vm, err := qemu.Start(ctx, opt.QEMU, args, qmp, opt.Console)
	if err != nil {
		return nil, "", err
	}
	defer vm.Quit(context.Background())
	if err := opt.Ready(ctx, vm); err != nil {
		return nil, "", err
	}
	if err := vm.Save(ctx, files.State); err != nil {
		return nil, "", err
	}
	vm.Quit(ctx)
	os.Remove(qmp)
	if st, err = store.Open(opt.StateDir, opt.Log); err != nil {
		return nil, "", err
	}
	defer st.Close()
	b, err := st.Import(opt.Name, files, overlay.DefaultChunkSize, 0, nil)
	if err != nil {
		return nil, "", err
	}
	return b, dir, nil
}

// copyFile copies src to dst (a reflink where the file system can).
func copyFile(src, dst string) error {
	out, err := exec.Command("cp", "--reflink=auto", "--sparse=always", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("copy %s: %v: %s", src, err, strings.TrimSpace(string(out)))
	}
	return nil
}
