package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Config is what vm.json records: everything needed to start the same
// virtual hardware again, so that a saved state resumes.
type Config struct {
	Machine   string   `json:"machine"`
	CPU       string   `json:"cpu"`
	SMP       int      `json:"smp"`
	MemoryMiB int      `json:"memory_mib"`
	DiskIf    string   `json:"disk_interface"`
	NIC       string   `json:"nic,omitempty"`        // e.g. e1000; empty: no network
	GuestPort int      `json:"guest_port,omitempty"` // forwarded from the host when set
	Kernel    string   `json:"kernel,omitempty"`     // file names beside vm.json
	Initrd    string   `json:"initrd,omitempty"`
	Append    string   `json:"append,omitempty"`
	Extra     []string `json:"extra_args,omitempty"`
	// Discard passes the guest's TRIM on to the disk file
	// (discard=unmap), and turns its writes of zeros into holes
	// (detect-zeroes=unmap). Off, as in a vm.json written before it
	// existed, the drive ignores discards.
	Discard bool `json:"discard,omitempty"`
	// Balloon gives the guest a virtio balloon with free page reporting:
	// the guest reports the pages it frees and QEMU punches them out of
	// the memory file. It is a device, so the saved state of a VM with it
	// resumes only on hardware with it.
	Balloon bool `json:"balloon,omitempty"`
}

// LoadConfig reads a vm.json.
func LoadConfig(b []byte) (*Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("vm.json: %w", err)
	}
	if c.Machine == "" || c.MemoryMiB <= 0 || c.DiskIf == "" {
		return nil, errors.New("vm.json: machine, memory_mib and disk_interface are required")
	}
	return &c, nil
}

// Run says how to start QEMU for one boot or resume.
type Run struct {
	Binary   string // qemu-system-x86_64 by default
	Accel    string // kvm or tcg, already resolved
	Memory   string // file holding guest RAM
	Share    bool   // share=on: RAM writes land in Memory (capture); off: private (resume)
	Disk     string
	QMP      string // unix socket path
	Incoming bool   // -incoming defer: wait for migrate-incoming
	HostPort int    // host side of the forwarded guest port, on 127.0.0.1
	// Forwards, if set, replace HostPort: each forwards a host address to
	// a guest TCP port, so a VM can serve on several ports.
	Forwards []Forward
	Dir      string // where Kernel and Initrd live
	Boot     bool   // pass -kernel/-initrd/-append
	// NoDiscard makes the drive ignore the guest's discards even where
	// the Config has Discard; the hardware the guest sees is the same.
	NoDiscard bool
}

// Forward is one TCP port forwarded from the host into the guest.
type Forward struct {
	HostAddr  string `json:"host_addr"` // an IP address of the host
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// Args builds the QEMU command line. Capture and resume use the same
// hardware, so only the RAM sharing, boot files and -incoming differ.
func (c *Config) Args(r Run) []string {
	mem := strconv.Itoa(c.MemoryMiB) + "M"
	share := "off"
	if r.Share {
		share = "on"
	}
	drive := fmt.Sprintf("file=%s,format=raw,if=%s,cache=writeback", qemuEscape(r.Disk), c.DiskIf)
	if c.Discard && !r.NoDiscard {
		drive += ",discard=unmap,detect-zeroes=unmap"
	}
	a := []string{
		"-nodefaults", "-no-user-config",
		"-machine", c.Machine + ",memory-backend=ram",
		"-accel", r.Accel,
		"-cpu", c.CPU,
		"-smp", strconv.Itoa(max(1, c.SMP)),
		"-m", mem,
		"-object", fmt.Sprintf("memory-backend-file,id=ram,size=%s,mem-path=%s,share=%s", mem, qemuEscape(r.Memory), share),
		"-drive", drive,
		"-display", "none", "-serial", "stdio", "-monitor", "none",
		"-qmp", "unix:" + r.QMP + ",server=on,wait=off",
	}
	if c.NIC != "" {
		netdev := "user,id=net0"
		fwd := r.Forwards
		if len(fwd) == 0 && c.GuestPort > 0 && r.HostPort > 0 {
			fwd = []Forward{{HostAddr: "127.0.0.1", HostPort: r.HostPort, GuestPort: c.GuestPort}}
		}
		for _, f := range fwd {
			host := f.HostAddr
			if strings.Contains(host, ":") {
				host = "[" + host + "]"
			}
			netdev += fmt.Sprintf(",hostfwd=tcp:%s:%d-:%d", host, f.HostPort, f.GuestPort)
		}
		a = append(a, "-netdev", netdev, "-device", c.NIC+",netdev=net0")
	}
	if c.Balloon {
		a = append(a, "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on")
	}
	if r.Boot && c.Kernel != "" {
		a = append(a, "-kernel", filepath.Join(r.Dir, c.Kernel))
		if c.Initrd != "" {
			a = append(a, "-initrd", filepath.Join(r.Dir, c.Initrd))
		}
		if c.Append != "" {
			a = append(a, "-append", c.Append)
		}
	}
	if r.Incoming {
		a = append(a, "-incoming", "defer")
	}
	return append(a, c.Extra...)
}

// qemuEscape doubles commas, QEMU's escape inside option values.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// ResolveAccel turns auto, kvm or tcg into the accelerator to use, and
// fails if KVM is asked for but cannot be used.
func ResolveAccel(want string) (string, error) {
	usable := probeKVM
	switch want {
	case "", "auto":
		if usable() == nil {
			return "kvm", nil
		}
		return "tcg", nil
	case "kvm":
		if err := usable(); err != nil {
			return "", fmt.Errorf("--accel kvm: KVM is not usable here (%v); use --accel tcg", err)
		}
		return "kvm", nil
	case "tcg":
		return "tcg", nil
	}
	return "", fmt.Errorf("--accel %q: want auto, kvm or tcg", want)
}

// CheckBinary makes sure the QEMU binary exists and runs.
func CheckBinary(bin string) (string, error) {
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return "", fmt.Errorf("%s not found: install qemu-system-x86 (make deps)", bin)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "QEMU emulator") {
		return "", fmt.Errorf("%s does not run (%v): %s", path, err, truncate(out, 200))
	}
	return path, nil
}

// VM is a running QEMU.
type VM struct {
	cmd   *exec.Cmd
	QMP   *Client
	stdin io.WriteCloser

	mu sync.Mutex
	// lines are the newest lines of the guest's console and of QEMU's own
	// messages, in the order they came; partial holds each stream's line
	// not yet ended.
	lines   []line
	partial [2]string
	changed chan struct{} // closed and replaced on every console line
	exited  chan struct{}
	waitErr error

	outMu sync.Mutex // orders both streams' writes to the console writer
}

// The two streams a VM prints.
const (
	guestConsole = 0 // the serial console: what the guest prints
	qemuMessages = 1 // QEMU's stderr: its warnings and errors
)

// line is one line of a stream.
type line struct {
	text string
	from int // guestConsole or qemuMessages
}

const keepLines = 200

// CloseOnExec marks every descriptor of this process above stderr
// close-on-exec, so that a child gets only what it is given. Go opens its
// own files so, but libraries need not: go-fuse's splice keeps /dev/null
// open without it. Start calls it; call it before starting any other child.
func CloseOnExec() {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, fd := range fds {
		if n, err := strconv.Atoi(fd.Name()); err == nil && n > 2 {
			syscall.CloseOnExec(n)
		}
	}
}

// Start runs QEMU with args. The serial console goes to console, if set,
// and is kept for WaitConsole; Type writes to it. QMP is connected before
// Start returns.
func Start(ctx context.Context, bin string, args []string, qmp string, console io.Writer) (*VM, error) {
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	os.Remove(qmp)
	v := &VM{changed: make(chan struct{}), exited: make(chan struct{})}
	v.cmd = exec.Command(bin, args...)
	// QEMU must not outlive its daemon: a VM whose mount is gone can
	// only fail, and a stopped `launch` or `capture` must not leave one
	// running behind. The kernel sends the signal when the thread that
	// started the child ends, so that thread is kept for the child's life.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var err error
	if v.stdin, err = v.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	out, err := v.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	// QEMU's messages come apart from the console: a warning printed while
	// the guest prints a line would otherwise cut that line in two, and
	// QEMU warns on every page the guest reports free when the memory
	// file refuses to punch it. They get a pipe of their own, not
	// StderrPipe, which Wait closes as soon as QEMU exits: the error QEMU
	// dies with is read to its end.
	msgs, msgsW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	v.cmd.Stderr = msgsW
	CloseOnExec()
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := v.cmd.Start(); err != nil {
			runtime.UnlockOSThread()
			started <- err
			return
		}
		started <- nil
		err := v.cmd.Wait()
		runtime.UnlockOSThread()
		v.mu.Lock()
		v.waitErr = err
		v.mu.Unlock()
		close(v.exited)
	}()
	err = <-started
	msgsW.Close()
	if err != nil {
		msgs.Close()
		return nil, fmt.Errorf("qemu: %w", err)
	}
	go v.read(out, console, guestConsole)
	msgsRead := make(chan struct{})
	go func() {
		v.read(msgs, console, qemuMessages)
		msgs.Close()
		close(msgsRead)
	}()
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	// A QEMU that exits at once (a bad option) never answers: stop
	// dialling then, and say what it printed.
	go func() {
		select {
		case <-v.exited:
			cancel()
		case <-dctx.Done():
		}
	}()
	qc, err := Dial(dctx, qmp)
	if err != nil {
		select {
		case <-v.exited:
			select {
			case <-msgsRead:
			case <-time.After(time.Second):
			}
			return nil, fmt.Errorf("qemu exited at once (%v); QEMU said:\n%s", v.ExitErr(), v.Tail(20))
		default:
		}
		v.Kill()
		return nil, fmt.Errorf("%w; QEMU said:\n%s", err, v.Tail(20))
	}
	v.QMP = qc
	return v, nil
}

// read keeps the lines of one stream, and copies it to console if set.
func (v *VM) read(r io.Reader, console io.Writer, from int) {
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if console != nil {
				v.outMu.Lock()
				console.Write(buf[:n])
				v.outMu.Unlock()
			}
			v.mu.Lock()
			text := v.partial[from] + strings.ReplaceAll(string(buf[:n]), "\r", "")
			parts := strings.Split(text, "\n")
			v.partial[from] = parts[len(parts)-1]
			for _, p := range parts[:len(parts)-1] {
				v.lines = append(v.lines, line{p, from})
			}
			if over := len(v.lines) - keepLines; over > 0 {
				v.lines = v.lines[over:]
			}
			close(v.changed)
			v.changed = make(chan struct{})
			v.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// Tail returns the last n lines of the console and of QEMU's messages.
func (v *VM) Tail(n int) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var lines []string
	for _, l := range v.lines[max(0, len(v.lines)-n):] {
		lines = append(lines, l.text)
	}
	if p := v.partial[qemuMessages]; p != "" {
		lines = append(lines, p)
	}
	lines = append(lines, v.partial[guestConsole])
	return strings.Join(lines, "\n")
}

// WaitConsole waits until a console line kept matches re (see ClearConsole),
// with its terminal escape sequences removed; QEMU's own messages are not
// matched. On timeout or exit it reports the last console lines.
func (v *VM) WaitConsole(ctx context.Context, re *regexp.Regexp, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		v.mu.Lock()
		for _, l := range v.lines {
			if l.from == guestConsole && re.MatchString(plain(l.text)) {
				v.mu.Unlock()
				return nil
			}
		}
		if re.MatchString(plain(v.partial[guestConsole])) {
			v.mu.Unlock()
			return nil
		}
		changed := v.changed
		v.mu.Unlock()
		select {
		case <-changed:
		case <-v.exited:
			return fmt.Errorf("QEMU exited before the console matched %q; last console lines:\n%s", re, v.Tail(15))
		case <-deadline.C:
			return fmt.Errorf("the console did not match %q within %s; last console lines:\n%s", re, timeout, v.Tail(15))
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// ClearConsole forgets the console lines seen so far.
func (v *VM) ClearConsole() {
	v.mu.Lock()
	v.lines = nil
	v.partial = [2]string{}
	v.mu.Unlock()
}

// Type sends text to the serial console.
func (v *VM) Type(s string) error {
	_, err := io.WriteString(v.stdin, s)
	return err
}

// Exited is closed when QEMU has exited.
func (v *VM) Exited() <-chan struct{} { return v.exited }

// ExitErr says how QEMU ended, once Exited is closed: nil for a clean exit,
// an *exec.ExitError naming the status or signal otherwise.
func (v *VM) ExitErr() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.waitErr
}

// Pid is QEMU's process ID.
func (v *VM) Pid() int { return v.cmd.Process.Pid }

// Kill stops QEMU at once.
func (v *VM) Kill() {
	v.cmd.Process.Kill()
	<-v.exited
}

// Quit asks QEMU to quit and waits, killing it if it does not.
func (v *VM) Quit(ctx context.Context) {
	if v.QMP != nil {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		v.QMP.Execute(qctx, "quit", nil)
		cancel()
	}
	select {
	case <-v.exited:
	case <-time.After(10 * time.Second):
		v.Kill()
	}
	if v.QMP != nil {
		v.QMP.Close()
	}
}

func ignoreShared(ctx context.Context, c *Client) error {
	_, err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	})
	return err
}

// Save stops the VM and writes its device state to state. With RAM in a
// shared file and x-ignore-shared, the state holds devices only: the RAM is
// already in the memory file.
func (v *VM) Save(ctx context.Context, state string) error {
	if _, err := v.QMP.Execute(ctx, "stop", nil); err != nil {
		return err
	}
	if err := ignoreShared(ctx, v.QMP); err != nil {
		return err
	}
	tmp := state + ".tmp"
	if _, err := v.QMP.Execute(ctx, "migrate", map[string]any{"uri": "exec:cat > " + shellQuote(tmp)}); err != nil {
		return err
	}
	if err := v.WaitMigration(ctx, "save"); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, state)
}

// Resume loads device state into a QEMU started with Incoming and lets it
// run. RAM comes from the memory file; nothing else is loaded.
func (v *VM) Resume(ctx context.Context, state string) error {
	if err := ignoreShared(ctx, v.QMP); err != nil {
		return err
	}
	if _, err := v.QMP.Execute(ctx, "migrate-incoming", map[string]any{"uri": "exec:cat " + shellQuote(state)}); err != nil {
		return err
	}
	if err := v.WaitMigration(ctx, "resume"); err != nil {
		return err
	}
	if st, err := v.QMP.Status(ctx); err == nil && st == "running" {
		return nil
	}
	_, err := v.QMP.Execute(ctx, "cont", nil)
	return err
}

// WaitMigration polls query-migrate until the migration ends: nil once it
// completed, an error naming what (save, resume...) if it failed.
func (v *VM) WaitMigration(ctx context.Context, what string) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, desc, err := v.QMP.MigrationStatus(ctx)
		if err != nil {
			return err
		}
		switch st {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("%s: migration %s: %s; last console lines:\n%s", what, st, desc, v.Tail(10))
		}
		if st == "" {
			// The incoming side reports nothing until it is done; it is
			// done when the VM leaves "inmigrate".
			if s, err := v.QMP.Status(ctx); err == nil && s != "inmigrate" {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: migration still %q after 2 minutes", what, st)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-v.exited:
			return fmt.Errorf("%s: QEMU exited; last console lines:\n%s", what, v.Tail(10))
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
