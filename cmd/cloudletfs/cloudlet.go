package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/cloudlet"
	"github.com/cloudletfs/cloudletfs/fetch"
)

var (
	cloudletFlag = &cli.StringFlag{Name: "cloudlet", EnvVars: []string{"CLOUDLETFS_CLOUDLET"}, Value: "http://127.0.0.1:8021",
		Usage: "the cloudlet service's URL"}
	tokenFileFlag = &cli.PathFlag{Name: "token-file", EnvVars: []string{"CLOUDLETFS_TOKEN_FILE"},
		Usage: "file holding the API token (sent as 'Authorization: Bearer TOKEN')"}
)

func cloudletCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "cloudlet",
			Usage:     "run the cloudlet service: users' devices ask it over HTTP for VMs from overlays",
			UsageText: "cloudletfs cloudlet [--listen 127.0.0.1:8021] [--token-file F [--open-status]] [--max-memory SIZE] [--max-vms N] [--allow-file]",
			Description: `A long-running daemon with a JSON API under /v1:
  POST   /v1/vms              {"overlay": URL, "headers": {...}, "ports": [8080], "probe": {"http": "/"}}
                              answers 202 with the VM's id; the VM is then synthesized with early start
  GET    /v1/vms              every VM: state, timeline, forwarded ports, the overlay's progress
  GET    /v1/vms/ID           one VM;  GET /v1/vms/ID/events: the same as server-sent events
  DELETE /v1/vms/ID           stop the VM and unmount (?forget=1 on a stopped VM forgets it)
  POST   /v1/vms/ID/handoff   {"to": URL, "token": T}: move the running VM to the cloudlet at URL
  POST   /v1/handoffs, PUT /v1/handoffs/H/segments/SHA, DELETE /v1/handoffs/H, and
  GET    /v1/handoffs/H/layer.overlay: what two cloudlets say to each other in a handoff
  GET    /v1/bases            the bases this cloudlet holds
  GET    /metrics             Prometheus metrics;  GET /: a status page
Overlay URLs are http://, https:// (presigned S3 URLs too), s3://BUCKET/KEY (endpoint
and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/credentials...), and
file:// with --allow-file. Each VM runs in a worker process of its own, with its mount
and its QEMU: stopping the daemon (Ctrl-C, or even kill -9) leaves the VMs running, and
the daemon started again on the same state dir finds them. Stop VMs with
'cloudletfs stop' or DELETE. The VMs' ports are forwarded on the --listen address.
With --token-file every call needs 'Authorization: Bearer TOKEN'; --open-status leaves
/ and /metrics open. Use 'cloudletfs synthesize' from any machine to ask for a VM.`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8021", Usage: "address of the API; the VMs' forwarded ports bind to its host"},
				&cli.PathFlag{Name: "token-file", Usage: "file holding the token every API call must bring as 'Authorization: Bearer TOKEN'"},
				&cli.BoolFlag{Name: "open-status", Usage: "with --token-file, serve / and /metrics without the token"},
				&cli.StringFlag{Name: "max-memory", Value: "0", Usage: "cap on the guest RAM of the VMs running at once, e.g. 16GiB (0: no cap); a VM past it is refused with 507"},
				&cli.IntFlag{Name: "max-vms", Value: 0, Usage: "cap on the VMs running at once (0: no cap); a VM past it is refused with 429"},
				&cli.BoolFlag{Name: "allow-file", Usage: "let requests name file:// overlays on this machine"},
				accelFlag, qemuFlag,
				&cli.DurationFlag{Name: "fetch-timeout", Value: 30 * time.Second, Usage: "longest a VM's read waits for its segment before failing with EIO"},
				&cli.DurationFlag{Name: "probe-timeout", Value: 10 * time.Minute, Usage: "how long a VM's probe is tried before the VM is failed"},
				cacheSizeFlag,
				&cli.StringFlag{Name: "advertise", Usage: "this cloudlet's URL as other cloudlets reach it, where a handoff's destination fetches the VM from (default: the URL the handoff was asked at)"},
			},
			Action: cloudletCmd,
		},
		{
			Name:   "cloudlet-worker",
			Usage:  "run one VM of the cloudlet service (started by the service)",
			Hidden: true,
			Action: func(c *cli.Context) error {
				if err := need(c, 1, "the VM's DIR"); err != nil {
					return err
				}
				return cloudlet.RunWorker(c.Context, c.Args().First(), os.Stdin, logger(c))
			},
		},
		{
			Name:      "synthesize",
			Usage:     "ask a cloudlet for a VM from an overlay and follow it until its application answers",
			UsageText: "cloudletfs synthesize --cloudlet http://HOST:8021 [--port 8080]... [--probe /] [--detach] OVERLAY-URL",
			Description: `OVERLAY-URL is http:// or https:// (a presigned S3 URL too), s3://BUCKET/KEY (read
with the cloudlet's own AWS credentials), or file:// on a cloudlet run with --allow-file;
the cloudlet, not this machine, fetches it.
Sends the request, follows the VM's events and prints its timeline as it happens:
admitted, metadata arrived, QEMU running, first response (a GET of --probe on the
first port answered 2xx), overlay complete. Ends by printing where the application
answers; the VM runs on until 'cloudletfs stop'. Exits 0 once the VM gave its first
response (with --probe '' or --detach: once it runs), 1 if it failed first.`,
			Flags: []cli.Flag{
				cloudletFlag, tokenFileFlag,
				&cli.IntSliceFlag{Name: "port", Usage: "guest TCP port to forward (repeatable; default: the one the overlay's vm.json names)"},
				&cli.StringFlag{Name: "probe", Value: "/", Usage: "path to GET on the first port until it answers 2xx: the first response ('' for none)"},
				&cli.StringSliceFlag{Name: "header", Usage: "HTTP header the cloudlet sends with every request for the overlay, e.g. 'Authorization: Bearer TOKEN' of the overlay's server (repeatable); the cloudlet's own token goes in --token-file"},
				&cli.BoolFlag{Name: "detach", Usage: "return once the VM runs"},
				&cli.DurationFlag{Name: "timeout", Value: 15 * time.Minute, Usage: "give up following the VM after this long (it runs on)"},
			},
			Action: synthesizeCmd,
		},
		{
			Name:      "handoff",
			Usage:     "move a running VM to another cloudlet, as its user moves",
			UsageText: "cloudletfs handoff --cloudlet URL-A [--token-file F] --to URL-B [--to-token-file F] ID",
			Description: `Asks cloudlet A to hand VM ID off to cloudlet B, which must hold the VM's base, and
prints the handoff's timeline as it happens. While the VM runs on A, A reads QEMU's own
precopy migration stream and sends B what the VM changed since it started, in rounds,
compressed with the codec that keeps the link busy; then QEMU stops the VM, A writes
the last round and the device state as a layered overlay on the VM's overlay, and B
resumes the VM from it as soon as its metadata has arrived, fetching the rest from A.
B needs to reach A at the URL A was asked at (or A's --advertise), and the VM's
overlay at the URL it was started from. Exits 0 once B has all of the VM and A has let
it go; 1 if the handoff failed, and then the VM runs on at A.`,
			Flags: []cli.Flag{
				cloudletFlag, tokenFileFlag,
				&cli.StringFlag{Name: "to", Usage: "the destination cloudlet's URL, as cloudlet A reaches it"},
				&cli.PathFlag{Name: "to-token-file", Usage: "file holding the destination's API token"},
				&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up following the handoff after this long (it goes on)"},
			},
			Action: handoffCmd,
		},
		{
			Name:      "vms",
			Usage:     "list a cloudlet's VMs",
			UsageText: "cloudletfs vms --cloudlet URL [--json]",
			Description: `One line a VM: its state, when it first answered, its overlay, the host addresses
of its ports and how much of its overlay has arrived; why failed VMs failed follows
the table.`,
			Flags:  []cli.Flag{cloudletFlag, tokenFileFlag, &cli.BoolFlag{Name: "json", Usage: "print the VMs as the API gives them, as a JSON array"}},
			Action: vmsCmd,
		},
		{
			Name:      "stop",
			Usage:     "stop VMs on a cloudlet and unmount them",
			UsageText: "cloudletfs stop --cloudlet URL [--forget] ID...",
			Description: `Stops each VM: QEMU quits, then its mount goes; it returns once they have. A VM
that had already ended is left as it is and said so. With --forget the cloudlet then
forgets the VM: its record, its logs and its console.`,
			Flags:  []cli.Flag{cloudletFlag, tokenFileFlag, &cli.BoolFlag{Name: "forget", Usage: "forget the VMs once stopped"}},
			Action: stopCmd,
		},
	}
}

// readToken reads a token file: its first line, which must not be empty.
func readToken(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", badFlag("--token-file: %v", err)
	}
	tok := strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0])
	if tok == "" {
		return "", badFlag("--token-file %s: the file is empty", path)
	}
	return tok, nil
}

func cloudletCmd(c *cli.Context) error {
	for _, f := range []string{"listen", "token-file"} {
		if c.IsSet(f) && c.String(f) == "" {
			return badFlag("--%s is empty: leave it out for the default, or give a value", f)
		}
	}
	token, err := readToken(c.Path("token-file"))
	if err != nil {
		return err
	}
	if c.Bool("open-status") && token == "" {
		return badFlag("--open-status: only means something with --token-file")
	}
	maxMem, err := humanize.ParseBytes(c.String("max-memory"))
	if err != nil {
		return badFlag("--max-memory %q: want a size such as 16GiB, or 0 for no cap", c.String("max-memory"))
	}
	if c.Int("max-vms") < 0 {
		return badFlag("--max-vms %d: want 0 (no cap) or more", c.Int("max-vms"))
	}
	limit, err := parseCacheSize(c)
	if err != nil {
		return err
	}
	bin, accel, err := qemuFlags(c)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		return fmt.Errorf("cloudlet: --listen: %w", err)
	}
	defer ln.Close()
	host := ln.Addr().(*net.TCPAddr).IP.String()
	s, err := cloudlet.New(cloudlet.Options{
		StateDir: c.String("state-dir"), HostAddr: host, Token: token, OpenStatus: c.Bool("open-status"),
		MaxMemory: int64(maxMem), MaxVMs: c.Int("max-vms"), AllowFile: c.Bool("allow-file"),
		Worker: []string{exe, "--state-dir", c.String("state-dir"), "--log-level", c.String("log-level"), "cloudlet-worker"},
		QEMU:   bin, Accel: accel, FetchTimeout: c.Duration("fetch-timeout"), ProbeTimeout: c.Duration("probe-timeout"),
		CacheSize: limit, Log: logger(c), Advertise: c.String("advertise"),
	})
	if err != nil {
		return err
	}
	if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() && token == "" {
		log := logger(c)
		log.Warn().Str("listen", ln.Addr().String()).Msg("the API is open to the network without a token: anyone who reaches it can start and stop VMs; give --token-file")
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 16 << 10,
		IdleTimeout: 2 * time.Minute}
	shut := make(chan struct{})
	go func() {
		defer close(shut)
		<-c.Context.Done()
		// Requests under way get 5 s to finish: an admission records its
		// worker before the registry closes.
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		srv.Close() // event streams do not end on their own
	}()
	fmt.Fprintf(c.App.Writer, "cloudlet listening on http://%s (%s, %d VMs running)\n", ln.Addr(), accel, running(s.List()))
	serr := srv.Serve(ln)
	if errors.Is(serr, http.ErrServerClosed) {
		<-shut
	}
	cerr := s.Close()
	if !errors.Is(serr, http.ErrServerClosed) {
		return serr
	}
	if cerr != nil {
		return cerr
	}
	if n := running(s.List()); n > 0 {
		fmt.Fprintf(c.App.ErrWriter, "cloudlet stopped; %d VMs run on, and a cloudlet started again on this state dir finds them (stop them with 'cloudletfs stop')\n", n)
	}
	return nil
}

func running(vms []cloudlet.VM) int {
	n := 0
	for _, v := range vms {
		if !v.State.Final() {
			n++
		}
	}
	return n
}

func client(c *cli.Context) (*cloudlet.Client, error) {
	token, err := readToken(c.Path("token-file"))
	if err != nil {
		return nil, err
	}
	cl, err := cloudlet.NewClient(c.String("cloudlet"), token)
	if err != nil {
		return nil, badFlag("%v", err)
	}
	return cl, nil
}

func synthesizeCmd(c *cli.Context) error {
	if err := need(c, 1, "one OVERLAY-URL"); err != nil {
		return err
	}
	cl, err := client(c)
	if err != nil {
		return err
	}
	req := cloudlet.Request{Overlay: c.Args().First(), Ports: c.IntSlice("port")}
	if p := c.String("probe"); p != "" {
		req.Probe = &cloudlet.Probe{HTTP: p}
	}
	for _, h := range c.StringSlice("header") {
		k, v, ok := strings.Cut(h, ":")
		if !ok || strings.TrimSpace(k) == "" {
			return badFlag("--header: want \"Name: value\", got a line without a name and a colon")
		}
		if req.Headers == nil {
			req.Headers = map[string]string{}
		}
		req.Headers[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	v, err := cl.Create(ctx, req)
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "VM %s on %s\n", v.ID, fetch.Redact(c.String("cloudlet")))
	printed := 0
	var lastProgress time.Time
	wantAnswer := req.Probe != nil && !c.Bool("detach")
	last, err := cl.Follow(ctx, v.ID, func(v cloudlet.VM) bool {
		for ; printed < len(v.Timeline); printed++ {
			s := v.Timeline[printed]
			fmt.Fprintf(w, "%8.3f s  %s\n", s.At, s.Text)
		}
		if p := v.Progress; p != nil && !p.Complete && time.Since(lastProgress) >= 5*time.Second {
			lastProgress = time.Now()
			fmt.Fprintf(w, "           overlay: %d/%d segments, %s of %s fetched\n", p.SegmentsPresent, p.Segments,
				humanize.IBytes(uint64(p.BytesFetched)), humanize.IBytes(uint64(p.OverlayBytes)))
		}
		switch v.State {
		case cloudlet.FirstResponse, cloudlet.Complete:
			return false
		case cloudlet.Running:
			return wantAnswer
		}
		return true
	})
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	switch last.State {
	case cloudlet.FirstResponse, cloudlet.Complete:
		printPorts(w, c.String("cloudlet"), last)
		return nil
	case cloudlet.Running:
		if !wantAnswer {
			printPorts(w, c.String("cloudlet"), last)
			return nil
		}
	case cloudlet.Failed:
		return fmt.Errorf("VM %s failed: %s", last.ID, last.Reason)
	case cloudlet.Stopped:
		return fmt.Errorf("VM %s stopped before its first response: %s", last.ID, last.Reason)
	}
	return fmt.Errorf("VM %s is %s after --timeout %s: it runs on; 'cloudletfs vms' follows it, 'cloudletfs stop %s' stops it", last.ID, last.State, c.Duration("timeout"), last.ID)
}

// printPorts says where the application answers. A port forwarded on all
// of the cloudlet's addresses is shown on the one the client reached.
func printPorts(w io.Writer, cloudletURL string, v cloudlet.VM) {
	u, _ := url.Parse(cloudletURL)
	for _, p := range v.Ports {
		fmt.Fprintf(w, "the application answers at %s (guest port %d of VM %s)\n", reachable(u, p.Host), p.Guest, v.ID)
	}
	if len(v.Ports) == 0 {
		fmt.Fprintf(w, "VM %s runs; no port of it is forwarded\n", v.ID)
	}
}

func reachable(cloudletURL *url.URL, hostPort string) string {
	host, port, err := net.SplitHostPort(hostPort)
	if err != nil || cloudletURL == nil {
		return hostPort
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = cloudletURL.Hostname()
	}
	return net.JoinHostPort(host, port)
}

func vmsCmd(c *cli.Context) error {
	cl, err := client(c)
	if err != nil {
		return err
	}
	vms, err := cl.List(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(vms)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	var failed []cloudlet.VM
	fmt.Fprintln(tw, "ID\tSTATE\tFIRST RESPONSE\tOVERLAY\tPORTS\tPROGRESS")
	for _, v := range vms {
		first := "-"
		if at, ok := v.At("first-response"); ok {
			first = fmt.Sprintf("%.1f s", at)
		}
		var ports []string
		for _, p := range v.Ports {
			ports = append(ports, fmt.Sprintf("%d→%s", p.Guest, p.Host))
		}
		progress := "-"
		if p := v.Progress; p != nil && p.Segments > 0 {
			progress = fmt.Sprintf("%d%%", p.SegmentsPresent*100/p.Segments)
		}
		if v.State == cloudlet.Failed {
			failed = append(failed, v)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.ID, v.State, first, v.Overlay, strings.Join(ports, " "), progress)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, v := range failed {
		fmt.Fprintf(c.App.Writer, "%s failed: %s\n", v.ID, v.Reason)
	}
	return nil
}

func stopCmd(c *cli.Context) error {
	cl, err := client(c)
	if err != nil {
		return err
	}
	var failed []string
	for _, id := range c.Args().Slice() {
		before, err := cl.Get(c.Context, id)
		if err == nil && before.State.Final() {
			fmt.Fprintf(c.App.Writer, "%s had already ended: %s (%s)\n", id, before.State, before.Reason)
		} else if err == nil {
			var v cloudlet.VM
			if v, err = cl.Stop(c.Context, id); err == nil {
				fmt.Fprintf(c.App.Writer, "%s %s\n", v.ID, v.State)
			}
		}
		if err == nil && c.Bool("forget") {
			err = cl.Forget(c.Context, id)
		}
		if err != nil {
			fmt.Fprintf(c.App.ErrWriter, "cloudletfs: stop %s: %v\n", id, err)
			failed = append(failed, id)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("stop: %d of %d VMs not stopped", len(failed), c.NArg())
	}
	return nil
}

func handoffCmd(c *cli.Context) error {
	if err := need(c, 1, "the ID of the VM to hand off"); err != nil {
		return err
	}
	if c.String("to") == "" {
		return badFlag("--to: give the destination cloudlet's URL, such as http://cloudlet-b:8021")
	}
	cl, err := client(c)
	if err != nil {
		return err
	}
	toToken, err := readToken(c.Path("to-token-file"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	id := c.Args().First()
	v, err := cl.Handoff(ctx, id, cloudlet.HandoffRequest{To: c.String("to"), Token: toToken})
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "handing VM %s off from %s to %s\n", id, fetch.Redact(c.String("cloudlet")), fetch.Redact(c.String("to")))
	hid := ""
	if v.Handoff != nil {
		hid = v.Handoff.ID
	}
	printed := 0
	last, err := cl.Follow(ctx, id, func(v cloudlet.VM) bool {
		h := v.Handoff
		if h == nil || hid != "" && h.ID != hid {
			return true
		}
		hid = h.ID
		for ; printed < len(h.Timeline); printed++ {
			s := h.Timeline[printed]
			fmt.Fprintf(w, "%8.3f s  %s\n", s.At, s.Text)
		}
		// A complete handoff ends with the VM's end here.
		return h.Phase != cloudlet.HandoffFailed
	})
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		var ae *cloudlet.APIError
		if !errors.As(err, &ae) || ae.Status != 404 {
			return err
		}
	}
	h := last.Handoff
	switch {
	case h == nil:
		return fmt.Errorf("VM %s is %s and shows no handoff", id, last.State)
	case h.Phase == cloudlet.HandoffFailed:
		return fmt.Errorf("the handoff of VM %s failed, and it runs on at %s: %s", id, fetch.Redact(c.String("cloudlet")), h.Reason)
	case h.Phase != cloudlet.HandoffComplete && last.State == cloudlet.Moved:
		return fmt.Errorf("VM %s runs on %s as VM %s, but that cloudlet did not get all of its layer: %s", id, fetch.Redact(c.String("to")), h.DestVM, h.Reason)
	case h.Phase != cloudlet.HandoffComplete:
		return fmt.Errorf("the handoff of VM %s is %s after --timeout %s; it goes on", id, h.Phase, c.Duration("timeout"))
	}
	fmt.Fprintf(w, "VM %s now runs on %s as VM %s: %d rounds, %s sent ahead, layer %s (metadata %s), downtime %.2f s\n", id,
		fetch.Redact(c.String("to")), h.DestVM, h.Rounds, humanize.IBytes(uint64(h.PushedBytes)), humanize.IBytes(uint64(h.LayerBytes)),
		humanize.IBytes(uint64(h.MetadataBytes)), h.DowntimeS)
	printPorts(w, c.String("to"), cloudlet.VM{ID: h.DestVM, Ports: h.DestPorts})
	return nil
}
