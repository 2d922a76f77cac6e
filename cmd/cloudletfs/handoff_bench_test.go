package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/cloudlet"
	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/serve"
	"github.com/cloudletfs/cloudletfs/session"
)

// BenchmarkHandoff moves the test guest's running VM from a cloudlet "A"
// to a cloudlet "B" on this machine over an emulated link, in two ways, side
// by side in one run, at 10, 25 and 100 Mbit/s with a 20 ms RTT:
//
//   - QEMU's own precopy live migration (default capabilities, downtime
//     limit 300 ms, no bandwidth cap) from A, a QEMU run by launch.Run off a
//     mount of the served overlay, to a QEMU on B started with -incoming,
//     its RAM a fresh file and its disk a copy of A's, made just before the
//     migration (pre-copied: neither its bytes nor its time are counted).
//     The migration stream goes through an in-process serve.Link.
//   - `cloudletfs handoff` between two `cloudletfs cloudlet` services, each
//     with its own state dir and copy of the base, through a link each way
//     (A pushes to B through one; B fetches the layer from A, A's
//     --advertise, through the other).
//
// A client asks the guest's application every 100 ms throughout and moves
// to B once B runs the VM. Every run starts from fresh state dirs and ends
// with every VM and process it started stopped. The markdown goes to the
// file BENCH_OUT names (default: the benchmark's log); BENCH_RATES (such as
// "25" or "10,100") measures other rates in Mbit/s. It runs only with
// -bench: tools/bench-handoff.sh.
func BenchmarkHandoff(b *testing.B) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		b.Skip("needs qemu-system-x86_64 (make deps)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		b.Skip("needs root and /dev/fuse")
	}
	rates := []int{10, 25, 100}
	if s := os.Getenv("BENCH_RATES"); s != "" {
		rates = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				b.Fatalf("BENCH_RATES=%q: want Mbit/s figures such as 10,25,100", s)
			}
			rates = append(rates, n)
		}
	}
	began := time.Now().UTC()
	load0 := hbLoad()
	fx := hbSetup(b)
	var rs []hbResult
	for _, mbit := range rates {
		for _, run := range []func(*testing.B, *hbFixture, int) hbResult{hbQEMU, hbHandoff} {
			r := run(b, fx, mbit)
			b.Logf("%d Mbit/s, %s: total %.2f s, complete %.2f s, downtime %.3f s, wire %s, parent %s, stall %.2f s",
				mbit, r.method, r.total, r.complete, r.downtime, hbMiB(r.wire), hbMiB(r.parent), r.stall)
			rs = append(rs, r)
		}
	}
	md := hbMarkdown(fx, rs, began, load0)
	if out := os.Getenv("BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(md), 0o644); err != nil {
			b.Fatal(err)
		}
	} else {
		b.Log("\n" + md)
	}
	for _, pair := range hbPairs(rs) {
		if pair.mbit != 25 {
			continue
		}
		q, h := pair.q, pair.h
		b.ReportMetric(q.total, "qemu-total-s")
		b.ReportMetric(h.total, "handoff-total-s")
		b.ReportMetric(h.complete, "handoff-complete-s")
		b.ReportMetric(q.downtime, "qemu-downtime-s")
		b.ReportMetric(h.downtime, "handoff-downtime-s")
		b.ReportMetric(float64(q.wire), "qemu-wire-bytes")
		b.ReportMetric(float64(h.wire), "handoff-wire-bytes")
		b.ReportMetric(q.total/h.total, "time-ratio")
		b.ReportMetric(float64(q.wire)/float64(h.wire), "bytes-ratio")
	}
}

// hbRTT is the emulated links' round-trip time.
const hbRTT = 20 * time.Millisecond

// hbServeRate is the overlay server's link: where A's VM and B's parent
// overlay come from.
const hbServeRate = "38mbit"

// hbMigrateLimit bounds QEMU's migration; one that has not converged by
// then is cancelled and reported as such.
const hbMigrateLimit = 10 * time.Minute

// hbFixture is what every run shares: the binary, the base's files and the
// served overlay.
type hbFixture struct {
	bin, qemu string
	root      string
	baseDir   string // disk.img, memory.img, state, vm.json of the base
	url       string // the app overlay, served over hbServeRate
	ovlBytes  int64
	ovlMeta   int64
	ovlSegs   int
	memMiB    int
	commit    string
}

func hbSetup(b *testing.B) *hbFixture {
	// A short root: QEMU's QMP sockets live under it, and a unix
	// socket's path must stay under 108 bytes.
	root, err := os.MkdirTemp("", "hb-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(root) })
	fx := &hbFixture{root: root}
	if fx.qemu, err = qemu.CheckBinary(""); err != nil {
		b.Fatal(err)
	}
	fx.bin = filepath.Join(fx.root, "cloudletfs")
	if out, err := exec.Command("go", "build", "-o", fx.bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	repo, err := filepath.Abs("../..")
	if err != nil {
		b.Fatal(err)
	}
	if out, err := exec.Command("git", "-C", repo, "describe", "--always", "--dirty").Output(); err == nil {
		fx.commit = strings.TrimSpace(string(out))
	}
	g := filepath.Join(repo, "build", "guest")
	if out, err := exec.Command(filepath.Join(repo, "tools", "guest", "build.sh"), g).CombinedOutput(); err != nil {
		b.Fatalf("building the guest: %v\n%s", err, out)
	}
	state := filepath.Join(fx.root, "setup")
	srv := filepath.Join(fx.root, "srv")
	if err := os.MkdirAll(srv, 0o755); err != nil {
		b.Fatal(err)
	}
	fx.run(b, "--state-dir", state, "base", "create", "--name", "guest", "--disk", filepath.Join(g, "disk.img"), "--memory-size", "256MiB",
		"--kernel", filepath.Join(g, "vmlinuz"), "--initrd", filepath.Join(g, "initrd.img"),
		"--append", "console=ttyS0 quiet", "--ready", "^guest-ready", "--accel", "tcg")
	ovl := filepath.Join(srv, "app.overlay")
	fx.run(b, "--state-dir", state, "overlay", "capture", "--base", "guest", "--script", filepath.Join(g, "app.script"),
		"--ready", "^app-ready", "--accel", "tcg", "-o", ovl)
	bases, _ := filepath.Glob(filepath.Join(state, "base-guest-*"))
	if len(bases) != 1 {
		b.Fatalf("base dirs of the guest: %v", bases)
	}
	fx.baseDir = bases[0]
	o, f, err := openOverlay(ovl)
	if err != nil {
		b.Fatal(err)
	}
	f.Close()
	fx.ovlBytes, fx.ovlMeta, fx.ovlSegs = o.Header.TotalLen(), o.Header.MetadataLen(), len(o.Manifest.Segments)
	cfg, err := qemu.LoadConfig(o.VMConfig)
	if err != nil {
		b.Fatal(err)
	}
	fx.memMiB = cfg.MemoryMiB
	p := hbStart(b, nil, fx.bin, "--state-dir", state, "serve", "--addr", "127.0.0.1:0", "--rate", hbServeRate, "--rtt", hbRTT.String(), srv)
	b.Cleanup(p.stop)
	l, err := p.line(30 * time.Second)
	if err != nil || len(strings.Fields(l)) < 4 {
		b.Fatalf("serve printed %q (%v); stderr:\n%s", l, err, p.errText())
	}
	fx.url = strings.Fields(l)[3] + "/app.overlay"
	return fx
}

// run runs cloudletfs to its end.
func (fx *hbFixture) run(b *testing.B, args ...string) string {
	b.Helper()
	out, err := exec.Command(fx.bin, args...).CombinedOutput()
	if err != nil {
		b.Fatalf("cloudletfs %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// importBase gives a fresh state dir the base.
func (fx *hbFixture) importBase(b *testing.B, state string) {
	d := fx.baseDir
	fx.run(b, "--state-dir", state, "base", "import", "--name", "guest", "--disk", filepath.Join(d, "disk.img"),
		"--memory", filepath.Join(d, "memory.img"), "--state", filepath.Join(d, "state"), "--vm-config", filepath.Join(d, "vm.json"))
}

// hbResult is one method's move at one rate. Times are seconds from the
// start of the move (QEMU: the migrate command; handoff: its request).
type hbResult struct {
	method   string // "QEMU precopy" or "cloudletfs handoff"
	mbit     int
	total    float64 // B runs the VM
	complete float64 // B has every byte of the VM (QEMU: = total; handoff: the layer and its parent)
	downtime float64 // QEMU: query-migrate's downtime; handoff: Handoff.DowntimeS
	wire     int64   // bytes both ways over the A-B link(s)
	parent   int64   // bytes B fetched of the parent overlay from its URL
	stall    float64 // the client's largest gap between two answers around the move
	failed   string  // the move did not happen: a migration that did not converge, for one
	note     string  // something odd of a move that happened
	// The client: B's first answer after B ran, and whether the counter
	// in the guest's RAM went on.
	firstAnswer float64
	counter     string
	load        string // load average and other QEMUs as the run began

	// QEMU
	ramTransferred, ramNormal, ramDuplicate int64
	syncs                                   int
	qemuTotalMs                             int64
	stopToRun                               float64 // A seen stopped to B seen running
	firstPass                               float64 // the first pass over RAM ended (s)
	firstPassBytes                          int64   // RAM sent by then
	// handoff
	rounds                                     int
	pushed, layer, metadata, final, layerFetch int64
	bStallMs, parentStallMs                    float64
	layerAt                                    float64 // B had all of the layer: it depends on A until then
	timeline, bTimeline                        string  // the command's output; B's VM's timeline
}

// hbScope runs what a run set up, undone in reverse, when the run ends.
type hbScope struct{ fns []func() }

func (s *hbScope) add(f func()) { s.fns = append(s.fns, f) }

func (s *hbScope) close() {
	for i := len(s.fns) - 1; i >= 0; i-- {
		s.fns[i]()
	}
}

// hbDir makes a fresh directory for one run; it goes, after whatever is
// still mounted under it, when the run ends.
func hbDir(b *testing.B, fx *hbFixture, sc *hbScope, name string) string {
	dir, err := os.MkdirTemp(fx.root, name+"-")
	if err != nil {
		b.Fatal(err)
	}
	sc.add(func() {
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		for _, l := range strings.Split(string(mi), "\n") {
			if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				if err := syscall.Unmount(f[4], 0); err != nil {
					b.Logf("unmounting %s, left by the run: %v", f[4], err)
					syscall.Unmount(f[4], syscall.MNT_DETACH)
				}
			}
		}
		os.RemoveAll(dir)
	})
	return dir
}

// hbQEMU is QEMU's precopy migration from a QEMU on A to one on B.
func hbQEMU(b *testing.B, fx *hbFixture, mbit int) hbResult {
	r := hbResult{method: "QEMU precopy", mbit: mbit, load: hbLoad()}
	sc := &hbScope{}
	defer sc.close()
	dir := hbDir(b, fx, sc, fmt.Sprintf("q%d", mbit))
	state := filepath.Join(dir, "state")
	fx.importBase(b, state)
	mnt := filepath.Join(dir, "mnt-a")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		b.Fatal(err)
	}

	// A: the VM off a mount of the served overlay, as `launch` runs it.
	ctx, cancel := context.WithCancel(context.Background())
	running := make(chan launch.Running, 1)
	ended := make(chan error, 1)
	consoleA := &lockedWriter{w: &bytes.Buffer{}}
	go func() {
		ended <- launch.Run(ctx, launch.Options{
			Session: session.Options{Overlay: fx.url, StateDir: state, Log: zerolog.Nop(), FetchTimeout: 30 * time.Second},
			QEMU:    fx.qemu, Accel: "tcg", Mountpoint: mnt, Console: consoleA,
			Running: func(ra launch.Running) { running <- ra },
		})
	}()
	sc.add(func() {
		cancel()
		select {
		case <-ended:
		case <-time.After(time.Minute):
			b.Logf("A's launch did not end within a minute of its stop")
		}
	})
	var ra launch.Running
	select {
	case ra = <-running:
	case err := <-ended:
		b.Fatalf("A's launch ended before QEMU ran: %v", err)
	case <-time.After(3 * time.Minute):
		b.Fatal("A's QEMU did not run within 3 minutes")
	}
	select {
	case <-ra.Session.Fetcher.Complete():
	case <-time.After(5 * time.Minute):
		b.Fatal("A's overlay was not complete within 5 minutes")
	}
	if len(ra.Forwards) == 0 {
		b.Fatal("A's VM forwards no port")
	}
	addrA := fmt.Sprintf("127.0.0.1:%d", ra.Forwards[0].HostPort)
	cl := newHBClient(addrA)
	sc.add(func() { cl.end() })
	if err := cl.waitFrom(addrA, 3, 2*time.Minute); err != nil {
		b.Fatalf("A's application: %v", err)
	}

	// B: the same hardware waiting for the stream, its RAM a fresh file,
	// its disk what A's is now (pre-copied, not counted).
	cfg, err := qemu.LoadConfig(ra.Session.Overlay.VMConfig)
	if err != nil {
		b.Fatal(err)
	}
	diskB, memB := filepath.Join(dir, "b-disk.img"), filepath.Join(dir, "b-memory.img")
	if err := hbCopy(filepath.Join(mnt, "disk", "image"), diskB); err != nil {
		b.Fatalf("copying A's disk: %v", err)
	}
	if f, err := os.Create(memB); err != nil {
		b.Fatal(err)
	} else if err := f.Truncate(int64(cfg.MemoryMiB) << 20); err != nil {
		b.Fatal(err)
	} else {
		f.Close()
	}
	qmpDir, err := os.MkdirTemp("", "hb-qmp-")
	if err != nil {
		b.Fatal(err)
	}
	sc.add(func() { os.RemoveAll(qmpDir) })
	qmpB := filepath.Join(qmpDir, "b.sock")
	portB, err := launch.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	inPort, err := launch.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	addrB := fmt.Sprintf("127.0.0.1:%d", portB)
	args := cfg.Args(qemu.Run{Accel: "tcg", Memory: memB, Share: false, Disk: diskB, QMP: qmpB, Incoming: true,
		Forwards: []qemu.Forward{{HostAddr: "127.0.0.1", HostPort: portB, GuestPort: cfg.GuestPort}}})
	consoleB := &lockedWriter{w: &bytes.Buffer{}}
	vmB, err := qemu.Start(context.Background(), fx.qemu, args, qmpB, consoleB)
	if err != nil {
		b.Fatalf("B's QEMU: %v", err)
	}
	sc.add(func() { vmB.Quit(context.Background()) })
	qmp := func(c *qemu.Client, cmd string, a any) json.RawMessage {
		b.Helper()
		qctx, qcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer qcancel()
		out, err := c.Execute(qctx, cmd, a)
		if err != nil {
			b.Fatalf("%s: %v", cmd, err)
		}
		return out
	}
	qmp(vmB.QMP, "migrate-incoming", map[string]any{"uri": fmt.Sprintf("tcp:127.0.0.1:%d", inPort)})
	link := hbLink(b, sc, fmt.Sprintf("127.0.0.1:%d", inPort), mbit)

	// A: default capabilities (launch's resume turned x-ignore-shared on;
	// A's RAM is private, so it is sent either way), no bandwidth cap, the
	// default downtime limit.
	qa := ra.VM.QMP
	qmp(qa, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": false}},
	})
	qmp(qa, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 34, "downtime-limit": 300})
	t0 := time.Now()
	qmp(qa, "migrate", map[string]any{"uri": "tcp:" + link.Addr().String()})
	var info hbMigrateInfo
	var stoppedAt time.Time
	for {
		raw := qmp(qa, "query-migrate", nil)
		if err := json.Unmarshal(raw, &info); err != nil {
			b.Fatalf("query-migrate: %v: %s", err, raw)
		}
		if r.firstPass == 0 && info.RAM.DirtySyncCount >= 2 {
			r.firstPass, r.firstPassBytes = time.Since(t0).Seconds(), info.RAM.Transferred
		}
		if stoppedAt.IsZero() {
			if st, err := qa.Status(context.Background()); err == nil && st != "running" {
				stoppedAt = time.Now()
			}
		}
		if info.Status == "completed" {
			break
		}
		if info.Status == "failed" || info.Status == "cancelled" {
			b.Fatalf("QEMU's migration %s: %s; A's console:\n%s\nB's console:\n%s", info.Status, info.Error, ra.VM.Tail(10), vmB.Tail(10))
		}
		if time.Since(t0) > hbMigrateLimit {
			qmp(qa, "migrate_cancel", nil)
			r.failed = fmt.Sprintf("did not converge in %s: %d dirty-sync rounds", hbMigrateLimit, info.RAM.DirtySyncCount)
			r.ramTransferred, r.ramNormal, r.ramDuplicate = info.RAM.Transferred, info.RAM.Normal, info.RAM.Duplicate
			r.syncs, r.counter = info.RAM.DirtySyncCount, "– (the VM stayed on A)"
			r.qemuTotalMs = info.TotalTime
			r.wire = link.Stats().Up + link.Stats().Down
			r.total = time.Since(t0).Seconds()
			return r
		}
		time.Sleep(20 * time.Millisecond)
	}
	cl.moveTo(addrB)
	for deadline := time.Now().Add(time.Minute); ; {
		st, err := vmB.QMP.Status(context.Background())
		if err == nil && st == "running" {
			break
		}
		if err == nil && st == "paused" {
			qmp(vmB.QMP, "cont", nil)
			continue
		}
		if time.Now().After(deadline) {
			b.Fatalf("B is %q (%v) a minute after the migration completed; B's console:\n%s", st, err, vmB.Tail(10))
		}
		time.Sleep(10 * time.Millisecond)
	}
	ranAt := time.Now()
	r.total = ranAt.Sub(t0).Seconds()
	r.complete = r.total
	r.downtime = float64(info.Downtime) / 1000
	if !stoppedAt.IsZero() {
		r.stopToRun = ranAt.Sub(stoppedAt).Seconds()
	}
	r.ramTransferred, r.ramNormal, r.ramDuplicate = info.RAM.Transferred, info.RAM.Normal, info.RAM.Duplicate
	r.syncs, r.qemuTotalMs = info.RAM.DirtySyncCount, info.TotalTime
	if err := cl.waitFrom(addrB, 5, 2*time.Minute); err != nil {
		// What the guest on B says on its console, and of itself.
		st, serr := vmB.QMP.Status(context.Background())
		r.note = fmt.Sprintf("B's application did not answer: %v", err)
		// The same asked of A's guest, let run again after the migration:
		// whether B's guest differs from A's.
		const ask = "dmesg | tail -n 8; df -k /mnt/app | tail -n 1; free; ps | wc -l; md5sum /bin/busybox; wget -q -T 5 -O - http://127.0.0.1:8080/cgi-bin/app"
		onB := hbGuestSays(vmB, ask, 20*time.Second)
		_, cerr := qa.Execute(context.Background(), "cont", nil)
		// The baseline's outcome is a figure, not a failure of this
		// benchmark.
		b.Logf("%d Mbit/s, QEMU precopy: %s; B is %q (%v); on its console:\n%s\nA's guest, let run again (%v):\n%s", mbit, r.note, st, serr,
			onB, cerr, hbGuestSays(ra.VM, ask, 20*time.Second))
	}
	st := link.Stats()
	r.wire = st.Up + st.Down
	hbAnswers(&r, cl.end(), t0, ranAt, addrA, addrB)
	return r
}

// hbMigrateInfo is what query-migrate says.
type hbMigrateInfo struct {
	Status    string `json:"status"`
	Error     string `json:"error-desc"`
	TotalTime int64  `json:"total-time"`
	Downtime  int64  `json:"downtime"`
	RAM       struct {
		Transferred    int64 `json:"transferred"`
		Duplicate      int64 `json:"duplicate"`
		Normal         int64 `json:"normal"`
		DirtySyncCount int   `json:"dirty-sync-count"`
	} `json:"ram"`
}

// hbLink starts an emulated link at mbit Mbit/s and hbRTT to target.
func hbLink(b *testing.B, sc *hbScope, target string, mbit int) *serve.Link {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	l := serve.NewLink(ln, target, serve.LinkOptions{Rate: float64(mbit) * 1e6 / 8, RTT: hbRTT})
	go l.Serve()
	sc.add(func() { l.Close() })
	return l
}

// hbHandoff is `cloudletfs handoff` between two cloudlet services.
func hbHandoff(b *testing.B, fx *hbFixture, mbit int) hbResult {
	r := hbResult{method: "cloudletfs handoff", mbit: mbit, load: hbLoad()}
	sc := &hbScope{}
	defer sc.close()
	dir := hbDir(b, fx, sc, fmt.Sprintf("h%d", mbit))
	stateA, stateB := filepath.Join(dir, "state-a"), filepath.Join(dir, "state-b")
	fx.importBase(b, stateA)
	fx.importBase(b, stateB)
	portA, err := launch.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	toA := hbLink(b, sc, fmt.Sprintf("127.0.0.1:%d", portA), mbit)
	urlA, pa := fx.startCloudlet(b, sc, stateA, "--listen", fmt.Sprintf("127.0.0.1:%d", portA), "--advertise", "http://"+toA.Addr().String())
	urlB, pb := fx.startCloudlet(b, sc, stateB, "--listen", "127.0.0.1:0")
	toB := hbLink(b, sc, strings.TrimPrefix(urlB, "http://"), mbit)
	clA, _ := cloudlet.NewClient(urlA, "")
	clB, _ := cloudlet.NewClient(urlB, "")
	ctx := context.Background()

	out := fx.run(b, "synthesize", "--cloudlet", urlA, "--probe", "/cgi-bin/app", fx.url)
	idm, appm := synthID.FindStringSubmatch(out), synthApp.FindStringSubmatch(out)
	if idm == nil || appm == nil {
		b.Fatalf("synthesize printed no VM id or application address:\n%s", out)
	}
	id, addrA := idm[1], appm[1]
	sc.add(func() {
		sctx, scancel := context.WithTimeout(ctx, 90*time.Second)
		defer scancel()
		for _, c := range []*cloudlet.Client{clA, clB} {
			vs, _ := c.List(sctx)
			for _, v := range vs {
				if !v.State.Final() {
					c.Stop(sctx, v.ID)
				}
			}
		}
	})
	fctx, fcancel := context.WithTimeout(ctx, 5*time.Minute)
	v, err := clA.Follow(fctx, id, func(v cloudlet.VM) bool { return v.State != cloudlet.Complete })
	fcancel()
	if v.State != cloudlet.Complete {
		b.Fatalf("A's VM is %s, not complete (%v): %s", v.State, err, v.Reason)
	}
	cl := newHBClient(addrA)
	sc.add(func() { cl.end() })
	if err := cl.waitFrom(addrA, 3, 2*time.Minute); err != nil {
		b.Fatalf("A's application: %v", err)
	}
	a0, b0 := toA.Stats(), toB.Stats()

	// The client moves to B once A says B runs the VM.
	var movedMu sync.Mutex
	var ranAt time.Time
	followed := make(chan cloudlet.VM, 1)
	hctx, hcancel := context.WithTimeout(ctx, 30*time.Minute)
	defer hcancel()
	go func() {
		last, _ := clA.Follow(hctx, id, func(v cloudlet.VM) bool {
			h := v.Handoff
			movedMu.Lock()
			if h != nil && len(h.DestPorts) > 0 && ranAt.IsZero() {
				ranAt = time.Now()
				cl.moveTo(h.DestPorts[0].Host)
			}
			movedMu.Unlock()
			return h == nil || h.Phase != cloudlet.HandoffComplete && h.Phase != cloudlet.HandoffFailed
		})
		followed <- last
	}()
	t0 := time.Now()
	hout, err := exec.Command(fx.bin, "handoff", "--cloudlet", urlA, id, "--to", "http://"+toB.Addr().String()).CombinedOutput()
	if err != nil {
		r.failed = "the handoff failed: " + err.Error()
		b.Errorf("%d Mbit/s: handoff: %v\n%s\nA's daemon said:\n%s\nB's daemon said:\n%s", mbit, err, hout, hbTail(pa.errText(), 30), hbTail(pb.errText(), 30))
		r.timeline = string(hout)
		return r
	}
	var last cloudlet.VM
	select {
	case last = <-followed:
	case <-time.After(time.Minute):
		b.Fatal("A's event stream did not end within a minute of the handoff")
	}

	r.timeline = string(hout)
	h := last.Handoff
	if h == nil || h.DestVM == "" {
		b.Fatalf("A's last view of the VM shows no handoff to a VM: %+v\n%s", last, hout)
	}
	// A's timeline: B runs the VM, and B has all of the layer, which
	// only A serves.
	r.total, r.layerAt = -1, -1
	for _, s := range h.Timeline {
		switch s.Step {
		case "dest-running":
			r.total = s.At
		case "dest-complete":
			r.layerAt = s.At
		}
	}
	// The command prints the same timeline, should A's stream have ended
	// before its last step.
	for _, l := range strings.Split(string(hout), "\n") {
		var at float64
		if _, err := fmt.Sscanf(strings.TrimSpace(l), "%f s", &at); err != nil {
			continue
		}
		if r.total < 0 && strings.Contains(l, "the destination runs the VM") {
			r.total = at
		}
		if r.layerAt < 0 && strings.Contains(l, "the destination has all of the") {
			r.layerAt = at
		}
	}
	if r.total < 0 || r.layerAt < 0 {
		b.Fatalf("the handoff's timeline lacks the destination running or having the layer:\n%s", hout)
	}
	r.downtime, r.rounds = h.DowntimeS, h.Rounds
	r.pushed, r.layer, r.metadata, r.final = h.PushedBytes, h.LayerBytes, h.MetadataBytes, h.FinalBytes
	// B has every byte of the VM once the parent, the VM's overlay, has
	// come from its URL too: B's own timeline says when.
	bctx, bcancel := context.WithTimeout(ctx, 10*time.Minute)
	bv, err := clB.Follow(bctx, h.DestVM, func(v cloudlet.VM) bool { return v.Handoff == nil || v.Handoff.Phase != cloudlet.HandoffComplete })
	bcancel()
	if err != nil || bv.Stats == nil || bv.Handoff == nil || bv.Handoff.Phase != cloudlet.HandoffComplete {
		b.Fatalf("B's VM %s is not complete: %v; %+v", h.DestVM, err, bv.Handoff)
	}
	var bt strings.Builder
	for _, st := range bv.Timeline {
		fmt.Fprintf(&bt, "%8.3f s  %s\n", bv.Requested.Add(time.Duration(st.At*float64(time.Second))).Sub(t0).Seconds(), st.Text)
	}
	r.bTimeline = bt.String()
	if at, ok := bv.At("complete"); ok {
		r.complete = bv.Requested.Add(time.Duration(at * float64(time.Second))).Sub(t0).Seconds()
	} else {
		b.Fatalf("B's VM %s is complete, and its timeline does not say when: %+v", h.DestVM, bv.Timeline)
	}
	r.layerFetch, r.bStallMs = bv.Stats.BytesFetched, bv.Stats.StallMs
	if p := bv.Stats.Parent; p != nil {
		r.parent, r.parentStallMs = p.Stats.BytesFetched, p.Stats.StallMs
	}
	if len(bv.Ports) == 0 {
		b.Fatalf("B's VM has no port: %+v", bv)
	}
	addrB := bv.Ports[0].Host
	movedMu.Lock()
	if ranAt.IsZero() {
		ranAt = t0.Add(time.Duration(r.total * float64(time.Second)))
		cl.moveTo(addrB)
	}
	movedMu.Unlock()
	if err := cl.waitFrom(addrB, 5, 2*time.Minute); err != nil {
		r.note = fmt.Sprintf("B's application did not answer: %v", err)
		b.Errorf("%d Mbit/s, handoff: %s\nB's daemon said:\n%s", mbit, r.note, hbTail(pb.errText(), 30))
	}
	a1, b1 := toA.Stats(), toB.Stats()
	r.wire = a1.Up + a1.Down + b1.Up + b1.Down - a0.Up - a0.Down - b0.Up - b0.Down
	if !hbAnswers(&r, cl.end(), t0, ranAt, addrA, addrB) {
		b.Errorf("%d Mbit/s, handoff: the counter in the guest's RAM %s", mbit, r.counter)
	}
	return r
}

// startCloudlet starts `cloudletfs cloudlet` on state and returns its URL;
// the run's end stops it, and any worker of it left.
func (fx *hbFixture) startCloudlet(b *testing.B, sc *hbScope, state string, args ...string) (string, *hbProc) {
	sc.add(func() { stopWorkers(b, state) }) // once the daemon has stopped
	p := hbStart(b, sc, fx.bin, append([]string{"--state-dir", state, "cloudlet", "--accel", "tcg"}, args...)...)
	l, err := p.line(60 * time.Second)
	m := regexp.MustCompile(`^cloudlet listening on (http://\S+) `).FindStringSubmatch(l)
	if err != nil || m == nil {
		b.Fatalf("cloudlet printed %q (%v); stderr:\n%s", l, err, p.errText())
	}
	return m[1], p
}

// hbAnswers takes the client's figures of a move that began at t0, with
// B running from ranAt, and reports whether the counter in the guest's RAM
// went on from A to B.
func hbAnswers(r *hbResult, as []hbAnswer, t0, ranAt time.Time, addrA, addrB string) bool {
	from := 0 // the last answer before the move
	for i, a := range as {
		if a.at.Before(t0) {
			from = i
		}
	}
	lastA, firstB, fromB, diskA, diskB := -1, -1, 0, "", ""
	for i := from; i < len(as); i++ {
		a := as[i]
		if i > from {
			r.stall = max(r.stall, a.at.Sub(as[i-1].at).Seconds())
		}
		if a.where == addrA {
			lastA, diskA = a.count, a.disk
		}
		if a.where == addrB {
			if firstB < 0 {
				firstB, diskB = a.count, a.disk
				r.firstAnswer = a.at.Sub(ranAt).Seconds()
			}
			if fromB++; fromB == 5 {
				break
			}
		}
	}
	went := "went on"
	if firstB <= lastA {
		went = "WENT BACK"
	}
	r.counter = fmt.Sprintf("%s: %d on A, then %d on B (disk: %q, then %q)", went, lastA, firstB, diskA, diskB)
	return firstB > lastA
}

// hbClient asks the test guest's application every 100 ms and keeps the
// answers, timed. A move cuts the request in flight, as a client told of
// the move would: a request to a stopped VM would otherwise wait out its
// timeout.
type hbClient struct {
	mu      sync.Mutex
	target  string
	cut     context.CancelFunc // the request in flight
	answers []hbAnswer
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

type hbAnswer struct {
	at    time.Time
	where string
	count int
	disk  string // what the answer says of the guest's disk, after its message
}

// hbAppAnswer is an answer of the test guest's application: the counter in
// its RAM, and after the custom disk's message what it says of the lines
// or blocks each request writes on the disk.
var hbAppAnswer = regexp.MustCompile(`^count=([0-9]+) sum=[0-9a-f]{32} disk=hello from the custom disk ?(.*)$`)

func newHBClient(target string) *hbClient {
	c := &hbClient{target: target, stop: make(chan struct{}), done: make(chan struct{})}
	go c.run()
	return c
}

func (c *hbClient) run() {
	defer close(c.done)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	next := time.Now()
	for {
		select {
		case <-c.stop:
			return
		case <-time.After(time.Until(next)):
		}
		next = time.Now().Add(100 * time.Millisecond)
		ctx, cancel := context.WithCancel(context.Background())
		c.mu.Lock()
		target := c.target
		c.cut = cancel
		c.mu.Unlock()
		var body []byte
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+target+"/cgi-bin/app", nil)
		if err == nil {
			var resp *http.Response
			if resp, err = hc.Do(req); err == nil {
				body, err = io.ReadAll(io.LimitReader(resp.Body, 4096))
				resp.Body.Close()
			}
		}
		cancel()
		if err != nil {
			continue
		}
		m := hbAppAnswer.FindStringSubmatch(strings.TrimSpace(string(body)))
		if m == nil {
			continue
		}
		a := hbAnswer{at: time.Now(), where: target, disk: m[2]}
		a.count, _ = strconv.Atoi(m[1])
		c.mu.Lock()
		c.answers = append(c.answers, a)
		c.mu.Unlock()
	}
}

func (c *hbClient) moveTo(target string) {
	c.mu.Lock()
	if c.target != target && c.cut != nil {
		c.cut()
	}
	c.target = target
	c.mu.Unlock()
}

// waitFrom waits until n answers came from where.
func (c *hbClient) waitFrom(where string, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c.mu.Lock()
		got := 0
		for _, a := range c.answers {
			if a.where == where {
				got++
			}
		}
		c.mu.Unlock()
		if got >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d answers from %s in %s, want %d", got, where, timeout, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *hbClient) end() []hbAnswer {
	c.once.Do(func() { close(c.stop) })
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]hbAnswer(nil), c.answers...)
}

// hbProc is a process of the benchmark's whose stdout lines are read.
type hbProc struct {
	cmd   *exec.Cmd
	lines chan string
	errw  *lockedWriter
	errb  *bytes.Buffer
	done  chan struct{}
	once  sync.Once
}

// hbStart starts bin; sc's end (or, without sc, the caller) stops it.
func hbStart(b *testing.B, sc *hbScope, bin string, args ...string) *hbProc {
	cmd := exec.Command(bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	p := &hbProc{cmd: cmd, lines: make(chan string, 100), errb: &bytes.Buffer{}, done: make(chan struct{})}
	p.errw = &lockedWriter{w: p.errb}
	cmd.Stderr = p.errw
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		cmd.Wait()
		close(p.done)
	}()
	if sc != nil {
		sc.add(p.stop)
	}
	return p
}

func (p *hbProc) line(timeout time.Duration) (string, error) {
	select {
	case l := <-p.lines:
		return l, nil
	case <-p.done:
		return "", fmt.Errorf("it exited")
	case <-time.After(timeout):
		return "", fmt.Errorf("no line within %s", timeout)
	}
}

func (p *hbProc) errText() string {
	p.errw.mu.Lock()
	defer p.errw.mu.Unlock()
	return p.errb.String()
}

// stop sends SIGTERM, then SIGKILL after 20 s, and waits.
func (p *hbProc) stop() {
	p.once.Do(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(20 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	})
}

// hbGuestSays types cmd into the guest's serial console and returns what
// the console showed until it ended, or wait passed.
func hbGuestSays(vm *qemu.VM, cmd string, wait time.Duration) string {
	vm.ClearConsole()
	vm.Type("\n" + cmd + "; echo hb-said-$((6*7))\n")
	err := vm.WaitConsole(context.Background(), regexp.MustCompile(`^hb-said-42`), wait)
	if err != nil {
		return err.Error()
	}
	return vm.Tail(30)
}

// hbTail is the last n lines of s.
func hbTail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

// hbCopy copies a file.
func hbCopy(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// hbLoad is the 1-minute load average and the QEMUs running (none of
// them this benchmark's when a run begins).
func hbLoad() string {
	l, _ := os.ReadFile("/proc/loadavg")
	n := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/comm")
	for _, p := range procs {
		if c, _ := os.ReadFile(p); strings.TrimSpace(string(c)) == "qemu-system-x86" || strings.TrimSpace(string(c)) == "qemu-system-x86_64" {
			n++
		}
	}
	f := strings.Fields(string(l))
	if len(f) == 0 {
		return fmt.Sprintf("?, %d QEMUs", n)
	}
	return fmt.Sprintf("%s, %d QEMUs", f[0], n)
}

func hbMiB(n int64) string { return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20)) }

type hbPair struct {
	mbit int
	q, h hbResult
}

func hbPairs(rs []hbResult) []hbPair {
	var out []hbPair
	for i := 0; i+1 < len(rs); i += 2 {
		out = append(out, hbPair{mbit: rs[i].mbit, q: rs[i], h: rs[i+1]})
	}
	return out
}

// hbMarkdown writes the results as docs/BENCHMARKS.md shows them.
func hbMarkdown(fx *hbFixture, rs []hbResult, began time.Time, load0 string) string {
	var w strings.Builder
	cpu := "?"
	if c, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		if m := regexp.MustCompile(`(?m)^model name\s*:\s*(.+)$`).FindSubmatch(c); m != nil {
			cpu = string(m[1])
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	qv, _ := exec.Command(fx.qemu, "--version").Output()
	fmt.Fprintf(&w, "### VM handoff against QEMU's precopy migration (%s to %s, %d cores, tcg)\n\n",
		began.Format("2006-01-02 15:04"), time.Now().UTC().Format("15:04 UTC"), runtime.NumCPU())
	fmt.Fprintf(&w, "- CPU: %s, %d cores; Linux %s; %s; %s\n", cpu, runtime.NumCPU(), strings.TrimSpace(string(kernel)),
		runtime.Version(), strings.TrimSpace(strings.SplitN(string(qv), "\n", 2)[0]))
	fmt.Fprintf(&w, "- tree: %s; load (1 min) and QEMUs running at the start: %s; at the end: %s\n", fx.commit, load0, hbLoad())
	fmt.Fprintf(&w, "- the test guest's app VM: %d MiB of RAM; overlay %d bytes (%s: metadata %d bytes, %d segments), served by `cloudletfs serve --rate %s --rtt %s`\n",
		fx.memMiB, fx.ovlBytes, hbMiB(fx.ovlBytes), fx.ovlMeta, fx.ovlSegs, hbServeRate, hbRTT)
	fmt.Fprintf(&w, "- A-B links: in-process `serve.Link`, each direction the rate and %s RTT; a client asks the app every 100 ms throughout\n", hbRTT)
	fmt.Fprintf(&w, "- QEMU: B's disk is a copy of A's made just before the migration, not counted in bytes or time; downtime-limit 300 ms, no bandwidth cap\n\n")
	fmt.Fprintf(&w, "| rate | method | total (s) | to complete (s) | downtime (s) | bytes on the wire | parent bytes | client stall (s) |\n")
	fmt.Fprintf(&w, "|---|---|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		total, complete := fmt.Sprintf("%.2f", r.total), fmt.Sprintf("%.2f", r.complete)
		switch {
		case r.failed != "" && r.method == "QEMU precopy":
			total, complete = "> "+total+" ("+r.failed+")", "–"
		case r.failed != "":
			total, complete = "– ("+r.failed+")", "–"
		}
		parent := "–"
		if r.method != "QEMU precopy" {
			parent = hbMiB(r.parent)
		}
		fmt.Fprintf(&w, "| %d Mbit/s | %s | %s | %s | %.3f | %s | %s | %.2f |\n", r.mbit, r.method, total, complete, r.downtime, hbMiB(r.wire), parent, r.stall)
	}
	fmt.Fprintf(&w, "\nTotal: from the move's start (QEMU: the migrate command; handoff: the command's start) to B running the VM. To complete: until B has every byte of the VM. Bytes on the wire: both directions of the A-B link(s). Parent bytes: what B fetched of the VM's overlay from the overlay server, not over the A-B links. Client stall: the largest gap between two answers of the client, from its last answer before the move to its fifth from B.\n\n")
	fmt.Fprintf(&w, "| rate | total time, QEMU ÷ handoff | to complete, QEMU ÷ handoff | bytes, QEMU ÷ handoff | handoff downtime (s) | 1 s + metadata ÷ rate (s) | downtime goal |\n")
	fmt.Fprintf(&w, "|---|---:|---:|---:|---:|---:|---|\n")
	for _, p := range hbPairs(rs) {
		limit := 1 + float64(p.h.metadata)*8/(float64(p.mbit)*1e6)
		met := "met"
		if p.h.downtime > limit {
			met = "missed"
		}
		more := "" // a migration cut short: its figures are lower bounds
		if p.q.failed != "" {
			more = "> "
		}
		if p.h.failed != "" {
			fmt.Fprintf(&w, "| %d Mbit/s | – | – | – | – | %.3f | %s |\n", p.mbit, limit, p.h.failed)
			continue
		}
		fmt.Fprintf(&w, "| %d Mbit/s | %s%.2f | %s%.2f | %s%.2f | %.3f | %.3f | %s |\n", p.mbit, more, p.q.total/p.h.total, more, p.q.total/p.h.complete,
			more, float64(p.q.wire)/float64(p.h.wire), p.h.downtime, limit, met)
	}
	fmt.Fprintf(&w, "\nQEMU precopy, from query-migrate on A: RAM sent, pages sent whole (normal) and as zero pages (duplicate), dirty-sync rounds, QEMU's own total time, when the first pass over RAM ended and what it had sent; \"A stopped → B running\" as polled over QMP every 20 ms.\n\n")
	fmt.Fprintf(&w, "| rate | RAM sent | normal / zero pages | rounds | QEMU total-time (s) | first pass (s, sent) | A stopped → B running (s) | B's first answer after it ran (s) | counter | load at start |\n")
	fmt.Fprintf(&w, "|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
	for _, r := range rs {
		if r.method == "QEMU precopy" {
			fmt.Fprintf(&w, "| %d Mbit/s | %s | %d / %d | %d | %.2f | %.2f, %s | %.3f | %.2f | %s | %s |\n", r.mbit, hbMiB(r.ramTransferred), r.ramNormal, r.ramDuplicate,
				r.syncs, float64(r.qemuTotalMs)/1000, r.firstPass, hbMiB(r.firstPassBytes), r.stopToRun, r.firstAnswer, strings.Trim(r.counter+"; "+r.note, "; "), r.load)
		}
	}
	fmt.Fprintf(&w, "\ncloudletfs handoff, from the source's Handoff: bytes sent ahead while the VM ran, the layer, its metadata and what was left to fetch; what B's mount fetched of the layer (from A); the stall of B's mount (wall time in which a read waited) on the layer and on the parent; B depends on A from running until it has all of the layer (A's timeline); it has every byte of the VM once the parent, the VM's overlay, has come from the overlay's URL too (B's timeline, on the same clock).\n\n")
	fmt.Fprintf(&w, "| rate | rounds | pushed | layer | metadata | final | B fetched of the layer | B's stall on the layer / on the parent (s) | B has the layer at (s) | B depends on A: running → layer (s) | B's first answer after it ran (s) | counter | load at start |\n")
	fmt.Fprintf(&w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
	for _, r := range rs {
		if r.method != "QEMU precopy" {
			fmt.Fprintf(&w, "| %d Mbit/s | %d | %s | %s | %s | %s | %s | %.2f / %.2f | %.2f | %.2f | %.2f | %s | %s |\n", r.mbit, r.rounds, hbMiB(r.pushed), hbMiB(r.layer), hbMiB(r.metadata),
				hbMiB(r.final), hbMiB(r.layerFetch), r.bStallMs/1000, r.parentStallMs/1000, r.layerAt, r.layerAt-r.total, r.firstAnswer, strings.Trim(r.counter+"; "+r.note, "; "), r.load)
		}
	}
	for _, r := range rs {
		if r.method != "QEMU precopy" {
			fmt.Fprintf(&w, "\nThe handoff at %d Mbit/s, as `cloudletfs handoff` printed it, then B's VM's timeline (from the command's start):\n\n```\n%s```\n\n```\n%s```\n", r.mbit, r.timeline, r.bTimeline)
		}
	}
	return w.String()
}
