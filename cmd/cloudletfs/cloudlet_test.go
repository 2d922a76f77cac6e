package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/cloudletfs/cloudletfs/cloudlet"
	"github.com/cloudletfs/cloudletfs/internal/browser"
	"github.com/cloudletfs/cloudletfs/internal/s3test"
)

// cloudletd is a running `cloudletfs cloudlet`.
type cloudletd struct {
	p   *proc
	url string
}

func startCloudlet(t *testing.T, e *env, args ...string) *cloudletd {
	t.Helper()
	p := e.start(append([]string{"cloudlet", "--listen", "127.0.0.1:0", "--accel", "tcg"}, args...)...)
	l := p.line(t)
	m := regexp.MustCompile(`^cloudlet listening on (http://\S+) `).FindStringSubmatch(l)
	if m == nil {
		t.Fatalf("cloudlet printed %q; stderr:\n%s", l, p.errText())
	}
	return &cloudletd{p: p, url: m[1]}
}

// synthesized is what `cloudletfs synthesize` printed of a VM.
type synthesized struct {
	id, out, app string // app: host:port where the application answers
}

var (
	synthID  = regexp.MustCompile(`(?m)^VM ([0-9a-f]+) on `)
	synthApp = regexp.MustCompile(`(?m)^the application answers at (\S+) `)
)

func parseSynth(t *testing.T, out string) synthesized {
	t.Helper()
	id, app := synthID.FindStringSubmatch(out), synthApp.FindStringSubmatch(out)
	if id == nil || app == nil {
		t.Fatalf("synthesize printed no VM id or application address:\n%s", out)
	}
	return synthesized{id: id[1], out: out, app: app[1]}
}

// appAnswer is the test guest's application: a counter and a checksum in
// the guest's RAM, a line from its custom disk, and what the request
// before wrote on the disk: each request writes its count into a block of
// its own with direct I/O, past the guest's page cache, and reads the
// block of the one before it from the disk.
var appAnswer = regexp.MustCompile(`^count=([0-9]+) sum=[0-9a-f]{32} disk=hello from the custom disk prev=([0-9]*)$`)

func askApp(t *testing.T, hostPort string) string {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + hostPort + "/cgi-bin/app")
	if err != nil {
		t.Fatalf("the application at %s: %v", hostPort, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	s := strings.TrimSpace(string(b))
	if resp.StatusCode != 200 || !appAnswer.MatchString(s) {
		t.Fatalf("the application at %s answered %s: %q", hostPort, resp.Status, s)
	}
	return s
}

// vmProcesses returns the PIDs of the QEMU processes that run off the
// mount of the cloudlet's VM id.
func vmProcesses(state, id string) []int {
	mnt := filepath.Join(state, "cloudlet", "vms", id, "mnt")
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), mnt+"/memory/image") {
			var pid int
			fmt.Sscanf(p, "/proc/%d/cmdline", &pid)
			out = append(out, pid)
		}
	}
	return out
}

func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	return strings.Contains(string(b), " "+dir+" ")
}

// testCloudlet runs the cloudlet service end to end on the test guest's
// overlay, served over an emulated 38 Mbit/s link at url (srvDir holds
// it): synthesize, the status page in Chromium, metrics, three VMs at
// once, admission, the daemon killed with SIGKILL and started again under
// running VMs, and stops through the API.
func testCloudlet(t *testing.T, e *env, srvDir, url, ovl, trace string) {
	bin := cloudletfsBinary(t)
	t.Cleanup(func() { stopWorkers(t, e.state) })
	run := func(args ...string) (string, error) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		return string(out), err
	}
	// Three more overlays of the same VM: one overlay's data runs in one
	// VM at a time.
	base := strings.TrimSuffix(url, "app.overlay")
	var urls = []string{url}
	for i, opt := range [][]string{{"--codec", "zstd"}, {"--segment-size", "512KiB"}, {"--segment-size", "2MiB"}} {
		name := fmt.Sprintf("app%d.overlay", i+2)
		if out, err := run(append([]string{"--state-dir", e.state, "overlay", "reorder", ovl, "--trace", trace, "-o", filepath.Join(srvDir, name)}, opt...)...); err != nil {
			t.Fatalf("overlay reorder: %v\n%s", err, out)
		}
		urls = append(urls, base+name)
	}
	tok := e.path("cloudlet.token")
	e.write("cloudlet.token", []byte("s3cret-token\n"))
	d := startCloudlet(t, e, "--token-file", tok, "--open-status", "--max-memory", "800MiB")
	cl, err := cloudlet.NewClient(d.url, "s3cret-token")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	synth := func(args ...string) synthesized {
		t.Helper()
		out, err := run(append([]string{"synthesize", "--cloudlet", d.url, "--token-file", tok, "--probe", "/cgi-bin/app"}, args...)...)
		if err != nil {
			t.Fatalf("synthesize %v: %v\n%s", args, err, out)
		}
		return parseSynth(t, out)
	}

	// One VM: the client prints the timeline as it happens and where the
	// application answers.
	first := synth(urls[0])
	for _, want := range []string{"requested", "metadata arrived", "QEMU running", "first response: HTTP 200 count="} {
		if !strings.Contains(first.out, want) {
			t.Fatalf("synthesize's timeline lacks %q:\n%s", want, first.out)
		}
	}
	askApp(t, first.app)

	// The API needs the token.
	if _, err := cloudlet.NewClient(d.url, ""); err == nil {
		nc, _ := cloudlet.NewClient(d.url, "")
		if _, err := nc.List(ctx); err == nil || !strings.Contains(err.Error(), "401") {
			t.Fatalf("the API answered without the token: %v", err)
		}
	}

	// An overlay cut short after its metadata: its VM fails, with the
	// reason, and the running VM does not notice.
	spare := filepath.Join(srvDir, "app4.overlay") // not run yet
	o, f, err := openOverlay(spare)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	whole, err := os.ReadFile(spare)
	if err != nil {
		t.Fatal(err)
	}
	e.write("cut/cut.overlay", whole[:o.Header.MetadataLen()+1000])
	cutSrv := e.start("serve", "--addr", "127.0.0.1:0", e.path("cut"))
	cutURL := strings.Fields(cutSrv.line(t))[3] + "/cut.overlay"
	bad, err := cl.Create(ctx, cloudlet.Request{Overlay: cutURL, Probe: &cloudlet.Probe{HTTP: "/cgi-bin/app"}})
	if err != nil {
		t.Fatalf("the cut overlay was refused at admission: %v", err)
	}
	waitState(t, cl, bad.ID, cloudlet.Failed, "")
	if v, _ := cl.Get(ctx, bad.ID); !strings.Contains(v.Reason, "EIO") && !strings.Contains(v.Reason, "truncated") {
		t.Fatalf("the VM of a cut overlay failed for another reason: %q", v.Reason)
	}
	askApp(t, first.app)
	cutSrv.cmd.Process.Kill()

	// Two more VMs at once, while a browser watches the status page.
	type result struct {
		s   synthesized
		err error
		out string
	}
	results := make(chan result, 2)
	for _, u := range urls[1:3] {
		go func() {
			out, err := run("synthesize", "--cloudlet", d.url, "--token-file", tok, "--probe", "/cgi-bin/app", u)
			var s synthesized
			if err == nil {
				id, app := synthID.FindStringSubmatch(out), synthApp.FindStringSubmatch(out)
				if id != nil && app != nil {
					s = synthesized{id: id[1], out: out, app: app[1]}
				}
			}
			results <- result{s, err, out}
		}()
	}
	statusPage(t, d.url, first.id)
	var vms = []synthesized{first}
	for range 2 {
		r := <-results
		if r.err != nil || r.s.id == "" {
			t.Fatalf("synthesize: %v\n%s", r.err, r.out)
		}
		vms = append(vms, r.s)
	}
	for _, v := range vms {
		askApp(t, v.app)
	}

	// A fourth 256 MiB VM does not fit in 800 MiB.
	if _, err := cl.Create(ctx, cloudlet.Request{Overlay: urls[3]}); err == nil || !strings.Contains(err.Error(), "507") || !strings.Contains(err.Error(), "--max-memory") {
		t.Fatalf("a VM past --max-memory: %v", err)
	}
	// The same overlay twice is refused: its data runs in one VM.
	if _, err := cl.Create(ctx, cloudlet.Request{Overlay: urls[0]}); err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("the same overlay twice: %v", err)
	}

	scrapeMetrics(t, d.url, len(vms))

	// The daemon dies: the VMs run on, and a new daemon finds them.
	d.p.cmd.Process.Signal(syscall.SIGKILL)
	d.p.wait(t)
	for _, v := range vms {
		askApp(t, v.app)
	}
	// While no daemon runs, the last VM's worker dies too, and its QEMU
	// with it: the new daemon reports it failed and cleans its mount.
	gone := vms[2]
	killWorker(t, e.state, gone.id)
	d = startCloudlet(t, e, "--token-file", tok, "--max-memory", "800MiB")
	if cl, err = cloudlet.NewClient(d.url, "s3cret-token"); err != nil {
		t.Fatal(err)
	}
	listed, err := cl.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	live := map[string]cloudlet.VM{}
	for _, v := range listed {
		if !v.State.Final() {
			live[v.ID] = v
		}
	}
	waitState(t, cl, gone.id, cloudlet.Failed, "died while the cloudlet daemon was not running")
	if mnt := filepath.Join(e.state, "cloudlet", "vms", gone.id, "mnt"); mounted(mnt) {
		t.Fatalf("the mount of the VM whose worker died, %s, was not cleaned up", mnt)
	}
	vms = vms[:2]
	for _, v := range vms {
		if _, ok := live[v.id]; !ok {
			t.Fatalf("VM %s is not listed as running after the restart: %+v", v.id, listed)
		}
		askApp(t, v.app)
	}
	// A worker that dies under the running daemon fails its VM only.
	crashed := vms[1]
	killWorker(t, e.state, crashed.id)
	waitState(t, cl, crashed.id, cloudlet.Failed, "its worker process died")
	if mnt := filepath.Join(e.state, "cloudlet", "vms", crashed.id, "mnt"); mounted(mnt) {
		t.Fatalf("the mount of the VM whose worker died, %s, was not cleaned up", mnt)
	}
	askApp(t, vms[0].app)
	vms = vms[:1]
	// The new daemon follows them: an event stream ends with the VM.
	ended := make(chan cloudlet.VM, 1)
	go func() {
		fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		v, _ := cl.Follow(fctx, vms[0].id, func(cloudlet.VM) bool { return true })
		ended <- v
	}()

	// Stopped through the API: its QEMU, mount and port go.
	v, err := cl.Stop(ctx, vms[0].id)
	if err != nil || v.State != cloudlet.Stopped {
		t.Fatalf("stop: %v, %+v", err, v)
	}
	select {
	case f := <-ended:
		if f.State != cloudlet.Stopped {
			t.Fatalf("the event stream ended with the VM %s", f.State)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the event stream did not end with the VM")
	}
	if pids := vmProcesses(e.state, vms[0].id); len(pids) > 0 {
		t.Fatalf("QEMU %v still runs after the stop", pids)
	}
	if mnt := filepath.Join(e.state, "cloudlet", "vms", vms[0].id, "mnt"); mounted(mnt) {
		t.Fatalf("%s is still mounted after the stop", mnt)
	}
	if c, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + vms[0].app + "/cgi-bin/app"); err == nil {
		c.Body.Close()
		t.Fatalf("the stopped VM's port still answers")
	}
	// The command stops a VM too, and says so of one already ended.
	out, err := run("stop", "--cloudlet", d.url, "--token-file", tok, crashed.id)
	if err != nil || !strings.Contains(out, crashed.id+" had already ended: failed") {
		t.Fatalf("cloudletfs stop of a failed VM: %v\n%s", err, out)
	}
	out, err = run("vms", "--cloudlet", d.url, "--token-file", tok)
	if err != nil || !strings.Contains(out, vms[0].id+"  stopped") || !strings.Contains(out, crashed.id+" failed: its worker process died") ||
		!strings.Contains(out, gone.id+" failed: its worker process died while the cloudlet daemon was not running") {
		t.Fatalf("cloudletfs vms: %v\n%s", err, out)
	}
	d.p.cmd.Process.Signal(syscall.SIGTERM)
	d.p.wait(t)

	t.Run("overlays in S3", func(t *testing.T) { testCloudletS3(t, e, filepath.Join(srvDir, "app4.overlay")) })
}

// testCloudletS3 synthesizes the VM of the overlay file ovl from a real
// S3-compatible server: by s3:// URL with the credentials of the
// daemon's environment, and by a presigned URL. A wrong key is refused
// at admission, and the key's secret appears nowhere.
func testCloudletS3(t *testing.T, e *env, ovl string) {
	bin := cloudletfsBinary(t)
	srv := s3test.Start(t)
	srv.Put(t, srv.Bucket, "vms/app.overlay", ovl)
	s3url := "s3://" + srv.Bucket + "/vms/app.overlay"
	synth := func(d *cloudletd, url string) synthesized {
		t.Helper()
		out, err := exec.Command(bin, "synthesize", "--cloudlet", d.url, "--probe", "/cgi-bin/app", url).CombinedOutput()
		if err != nil {
			t.Fatalf("synthesize %s: %v\n%s", url, err, out)
		}
		return parseSynth(t, string(out))
	}
	stop := func(d *cloudletd, id string) {
		t.Helper()
		cl, _ := cloudlet.NewClient(d.url, "")
		if v, err := cl.Stop(context.Background(), id); err != nil || v.State != cloudlet.Stopped {
			t.Fatalf("stop: %v %+v", err, v)
		}
	}

	// A wrong secret: refused when the VM is asked for, naming the
	// object and what to check, never the secret.
	wrong := srv.Readers[0]
	wrong.SecretKey = "wrong-" + wrong.SecretKey
	srv.Env(t, wrong)
	d := startCloudlet(t, e)
	cl, _ := cloudlet.NewClient(d.url, "")
	_, err := cl.Create(context.Background(), cloudlet.Request{Overlay: s3url})
	if err == nil || !strings.Contains(err.Error(), "s3://"+srv.Bucket+"/vms/app.overlay") || !strings.Contains(err.Error(), "credentials") {
		t.Fatalf("a wrong key: %v", err)
	}
	if strings.Contains(err.Error(), wrong.SecretKey) || strings.Contains(d.p.errText(), wrong.SecretKey) {
		t.Fatal("the secret key appears in the error or the daemon's log")
	}
	d.p.cmd.Process.Signal(syscall.SIGTERM)
	d.p.wait(t)

	// The right key, from the daemon's environment.
	srv.Env(t, srv.Readers[0])
	d = startCloudlet(t, e)
	v := synth(d, s3url)
	askApp(t, v.app)
	stop(d, v.id)

	// A presigned URL is an https:// (here http://) URL like any other.
	u, err := srv.Client(t, srv.Readers[1]).PresignedGetObject(context.Background(), srv.Bucket, "vms/app.overlay", time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	v = synth(d, u.String())
	askApp(t, v.app)
	stop(d, v.id)
	if strings.Contains(d.p.errText(), srv.Readers[0].SecretKey) {
		t.Fatal("the secret key appears in the daemon's log")
	}
	d.p.cmd.Process.Signal(syscall.SIGTERM)
	d.p.wait(t)
}

// killWorker kills the worker of the cloudlet's VM id with SIGKILL and
// waits until its QEMU, which dies with it, is gone.
func killWorker(t *testing.T, state, id string) {
	t.Helper()
	dir := filepath.Join(state, "cloudlet", "vms", id)
	killed := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, _ := os.ReadFile(p); strings.HasSuffix(string(b), "cloudlet-worker\x00"+dir+"\x00") {
			var pid int
			fmt.Sscanf(p, "/proc/%d/cmdline", &pid)
			syscall.Kill(pid, syscall.SIGKILL)
			killed++
		}
	}
	if killed != 1 {
		t.Fatalf("found %d workers of VM %s", killed, id)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(vmProcesses(state, id)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the QEMU of VM %s outlived its worker by 30 s", id)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitState follows a VM until it is in state want with a reason that
// holds reason.
func waitState(t *testing.T, cl *cloudlet.Client, id string, want cloudlet.State, reason string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := cl.Follow(ctx, id, func(v cloudlet.VM) bool { return v.State != want })
	if v.State != want || !strings.Contains(v.Reason, reason) {
		t.Fatalf("VM %s is %s (%q, %v), want %s with %q", id, v.State, v.Reason, err, want, reason)
	}
}

// stopWorkers stops the cloudlet workers of the state dir that a failed
// test left running, as a stop through the API would, and kills those that
// do not stop.
func stopWorkers(t testing.TB, state string) {
	find := func() []int {
		var out []int
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			b, _ := os.ReadFile(p)
			if strings.Contains(string(b), "cloudlet-worker\x00"+filepath.Join(state, "cloudlet", "vms")) {
				var pid int
				fmt.Sscanf(p, "/proc/%d/cmdline", &pid)
				out = append(out, pid)
			}
		}
		return out
	}
	for _, pid := range find() {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(find()) > 0 {
		if time.Now().After(deadline) {
			for _, pid := range find() {
				t.Logf("killing worker %d, which did not stop", pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// scrapeMetrics checks /metrics with the Prometheus text parser: n VMs
// answered, each resumed and responded once.
func scrapeMetrics(t *testing.T, url string, n int) {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	get := func(name string) []float64 {
		f := fams[name]
		if f == nil {
			t.Fatalf("/metrics lacks %s", name)
		}
		var out []float64
		for _, m := range f.Metric {
			switch {
			case m.Gauge != nil:
				out = append(out, m.Gauge.GetValue())
			case m.Counter != nil:
				out = append(out, m.Counter.GetValue())
			case m.Histogram != nil:
				out = append(out, float64(m.Histogram.GetSampleCount()))
			}
		}
		return out
	}
	answered := 0.0
	for _, m := range fams["cloudletfs_vms"].GetMetric() {
		for _, l := range m.Label {
			if l.GetName() == "state" && (l.GetValue() == "first-response" || l.GetValue() == "complete") {
				answered += m.Gauge.GetValue()
			}
		}
	}
	if int(answered) != n {
		t.Fatalf("cloudletfs_vms counts %v VMs answered, want %d", answered, n)
	}
	// The VM of the cut overlay may have resumed before it failed.
	if c := get("cloudletfs_vm_resume_seconds"); len(c) != 1 || int(c[0]) < n || int(c[0]) > n+1 {
		t.Fatalf("cloudletfs_vm_resume_seconds holds %v samples, want %d or %d", c, n, n+1)
	}
	if c := get("cloudletfs_vm_first_response_seconds"); len(c) != 1 || int(c[0]) != n {
		t.Fatalf("cloudletfs_vm_first_response_seconds holds %v samples, want %d", c, n)
	}
	if c := get("cloudletfs_vm_ended_total"); len(c) != 1 || c[0] != 1 {
		t.Fatalf("cloudletfs_vm_ended_total: %v, want the one failed VM", c)
	}
	fetched := get("cloudletfs_vm_fetched_bytes_total")
	if len(fetched) != n {
		t.Fatalf("cloudletfs_vm_fetched_bytes_total has %d series, want %d", len(fetched), n)
	}
	if c := get("cloudletfs_cache_bytes"); len(c) != 1 || c[0] <= 0 {
		t.Fatalf("cloudletfs_cache_bytes: %v", c)
	}
}

// statusPage loads the status page in Chromium while VMs start, and
// checks what a person sees: every VM with its state, its timeline up to
// the first response, its forwarded port and its overlay's progress, and
// the base.
func statusPage(t *testing.T, url, firstID string) {
	t.Helper()
	b := browser.New(t)
	b.Open(t, url+"/")
	b.WaitText(t, "#summary", "4 VMs", time.Minute)
	b.WaitText(t, "#bases", "guest", 10*time.Second)
	cl, err := cloudlet.NewClient(url, "s3cret-token")
	if err != nil {
		t.Fatal(err)
	}
	vms, err := cl.List(context.Background())
	if err != nil || len(vms) != 4 {
		t.Fatalf("listing: %v, %d VMs", err, len(vms))
	}
	for _, v := range vms {
		if v.State == cloudlet.Failed {
			if row := b.WaitText(t, "#vm-"+v.ID, "failed", 10*time.Second); !strings.Contains(row, v.Reason[:20]) {
				t.Fatalf("the status page's row of the failed VM %s lacks its reason:\n%s", v.ID, row)
			}
			continue
		}
		row := b.WaitText(t, "#vm-"+v.ID, "first response: HTTP 200 count=", 3*time.Minute)
		for _, want := range []string{"QEMU running", "8080 → 127.0.0.1:", "segments", "base guest"} {
			if !strings.Contains(row, want) {
				t.Fatalf("the status page's row of VM %s lacks %q:\n%s", v.ID, want, row)
			}
		}
		if !regexp.MustCompile(`first-response|complete`).MatchString(row) {
			t.Fatalf("the status page shows VM %s in no answered state:\n%s", v.ID, row)
		}
	}
	if !strings.Contains(b.Text(t, "#vm-"+firstID), "first response") {
		t.Fatal("the first VM's row lost its first response")
	}
}

// A cloudlet that listens beyond loopback without a token says so, and an
// empty --listen or --token-file is refused rather than taken for the
// default.
func TestCloudletWarnsWhenOpen(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("needs qemu-system-x86_64 (make deps)")
	}
	e := newEnv(t)
	d := e.start("cloudlet", "--listen", "0.0.0.0:0", "--accel", "tcg")
	if l := d.line(t); !strings.HasPrefix(l, "cloudlet listening on ") {
		t.Fatalf("cloudlet printed %q; stderr:\n%s", l, d.errText())
	}
	d.waitFor(t, "the API is open to the network without a token")
	d.cmd.Process.Signal(syscall.SIGTERM)
	d.wait(t)
	for _, args := range [][]string{{"--listen", ""}, {"--token-file", ""}} {
		out, err := exec.Command(cloudletfsBinary(t), append([]string{"--state-dir", e.state, "cloudlet", "--accel", "tcg"}, args...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), args[0]+" is empty") {
			t.Errorf("cloudlet %v: %v\n%s", args, err, out)
		}
	}
}
