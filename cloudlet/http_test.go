package cloudlet_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/cloudletfs/cloudletfs/cloudlet"
	"github.com/cloudletfs/cloudletfs/internal/browser"
)

// unreachable is an overlay URL nobody serves: requests that fail
// validation must be refused before it is tried.
const unreachable = "http://127.0.0.1:1/x.overlay"

func TestCreateRefusesBadRequests(t *testing.T) {
	u := start(t, cloudlet.Options{})
	for _, tc := range []struct {
		name, body string
		status     int
		field      string
		says       string // the message holds this
		hides      string // and not this
	}{
		{"missing overlay", `{}`, 400, "overlay", "missing", ""},
		{"empty overlay", `{"overlay": ""}`, 400, "overlay", "missing", ""},
		{"ftp", `{"overlay": "ftp://example.org/x.overlay"}`, 400, "overlay", "refused", ""},
		{"no scheme", `{"overlay": "example.org/x.overlay"}`, 400, "overlay", "no scheme", ""},
		{"no host", `{"overlay": "http:///x.overlay"}`, 400, "overlay", "no host", ""},
		{"s3 without key", `{"overlay": "s3://bucket"}`, 400, "overlay", "s3://BUCKET/KEY", ""},
		{"file without AllowFile", `{"overlay": "file:///tmp/x.overlay"}`, 400, "overlay", "--allow-file", ""},
		{"password in a bad URL", `{"overlay": "http://u:hunter2@example.org/%zz"}`, 400, "overlay", "not a valid URL", "hunter2"},
		{"port 0", `{"overlay": "` + unreachable + `", "ports": [0]}`, 400, "ports", "0 is not a TCP port", ""},
		{"port 70000", `{"overlay": "` + unreachable + `", "ports": [8080, 70000]}`, 400, "ports", "70000 is not a TCP port", ""},
		{"port twice", `{"overlay": "` + unreachable + `", "ports": [8080, 22, 8080]}`, 400, "ports", "8080 is named twice", ""},
		{"probe without http", `{"overlay": "` + unreachable + `", "probe": {}}`, 400, "probe", `"http"`, ""},
		{"probe not a path", `{"overlay": "` + unreachable + `", "probe": {"http": "health"}}`, 400, "probe.http", "starting with /", ""},
		{"probe with a space", `{"overlay": "` + unreachable + `", "probe": {"http": "/a b"}}`, 400, "probe.http", "no spaces", ""},
		{"header name with a colon", `{"overlay": "` + unreachable + `", "headers": {"X-Key:": "v"}}`, 400, "headers", "not a header name", ""},
		{"header value with CRLF", `{"overlay": "` + unreachable + `", "headers": {"X-Key": "tok-7f3a\r\nX-Evil: 1"}}`, 400, "headers", "line break", "tok-7f3a"},
		{"unknown field", `{"overlay": "` + unreachable + `", "colour": "blue"}`, 400, "colour", "unknown field", ""},
		{"overlay not a string", `{"overlay": 5}`, 400, "overlay", "want a JSON string", ""},
		{"ports not a list", `{"overlay": "` + unreachable + `", "ports": "8080"}`, 400, "ports", "want a JSON", ""},
		{"not JSON", `overlay=http://example.org/x.overlay`, 400, "", "not a JSON request", ""},
		{"two JSON values", `{"overlay": "` + unreachable + `"} {}`, 400, "", "more than one JSON value", ""},
		{"over 64 KiB", `{"overlay": "http://example.org/` + strings.Repeat("a", 70<<10) + `"}`, 413, "", "larger than 65536 bytes", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, e, _ := u.call(t, http.MethodPost, "/v1/vms", "", tc.body)
			if status != tc.status || e.Field != tc.field {
				t.Fatalf("got %d field %q (%s), want %d field %q", status, e.Field, e.Error, tc.status, tc.field)
			}
			if !strings.Contains(e.Error, tc.says) {
				t.Errorf("message %q does not say %q", e.Error, tc.says)
			}
			if tc.hides != "" && strings.Contains(e.Error, tc.hides) {
				t.Errorf("message %q repeats %q", e.Error, tc.hides)
			}
		})
	}
	if vms, err := u.client.List(context.Background()); err != nil || len(vms) != 0 {
		t.Fatalf("after refused requests the cloudlet lists %v (%v), want no VMs", vms, err)
	}

	// The client gives the same refusal as an APIError.
	_, err := u.client.Create(context.Background(), cloudlet.Request{Overlay: unreachable, Ports: []int{70000}})
	apiError(t, "client create with port 70000", err, 400, "ports")
}

func TestTokenGuardsTheAPI(t *testing.T) {
	const token = "t0ken-1b9c"
	for _, open := range []bool{false, true} {
		u := start(t, cloudlet.Options{Token: token, OpenStatus: open})
		for _, tc := range []struct {
			path   string
			status bool // a status path, open with OpenStatus
		}{{"/v1/vms", false}, {"/v1/bases", false}, {"/metrics", true}, {"/", true}} {
			for _, try := range []struct{ name, token string }{{"no token", ""}, {"wrong token", "t0ken-1b9"}, {"token as the prefix", token + "x"}} {
				want := http.StatusUnauthorized
				if tc.status && open {
					want = http.StatusOK
				}
				req, _ := http.NewRequest(http.MethodGet, u.srv.URL+tc.path, nil)
				if try.token != "" {
					req.Header.Set("Authorization", "Bearer "+try.token)
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != want {
					t.Errorf("OpenStatus %v: GET %s with %s: %d, want %d", open, tc.path, try.name, resp.StatusCode, want)
				}
				if resp.StatusCode == http.StatusUnauthorized && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
					t.Errorf("GET %s with %s: 401 without a Bearer challenge", tc.path, try.name)
				}
			}
			if status, e, _ := u.call(t, http.MethodGet, tc.path, token, ""); status != http.StatusOK {
				t.Errorf("OpenStatus %v: GET %s with the token: %d (%s), want 200", open, tc.path, status, e.Error)
			}
		}
		// A refused POST never reaches validation.
		if status, e, _ := u.call(t, http.MethodPost, "/v1/vms", "", `{}`); status != http.StatusUnauthorized || !strings.Contains(e.Error, "token") {
			t.Errorf("POST /v1/vms without the token: %d %q, want 401 naming the token", status, e.Error)
		}
		if _, err := u.client.List(context.Background()); err != nil {
			t.Errorf("the client with the token: %v", err)
		}
		wrong, err := cloudlet.NewClient(u.srv.URL, "nope")
		if err != nil {
			t.Fatal(err)
		}
		_, err = wrong.List(context.Background())
		apiError(t, "client with a wrong token", err, 401, "")
	}
}

func TestUnknownVMsAndPathsAre404(t *testing.T) {
	u := start(t, cloudlet.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := u.client.Get(ctx, "0123456789ab")
	apiError(t, "get", err, 404, "")
	_, err = u.client.Stop(ctx, "0123456789ab")
	apiError(t, "stop", err, 404, "")
	_, err = u.client.Follow(ctx, "0123456789ab", func(cloudlet.VM) bool { return true })
	ae := apiError(t, "follow", err, 404, "")
	if !strings.Contains(ae.Msg, "0123456789ab") {
		t.Errorf("404 message %q does not name the VM", ae.Msg)
	}
	for _, c := range []struct{ method, path string }{
		{http.MethodGet, "/v1/vms/0123456789ab"},
		{http.MethodDelete, "/v1/vms/0123456789ab"},
		{http.MethodDelete, "/v1/vms/0123456789ab?forget=1"},
		{http.MethodGet, "/v1/vms/0123456789ab/events"},
		{http.MethodGet, "/v1/nothing"},
		{http.MethodGet, "/nothing"},
		{http.MethodGet, "/metrics/x"},
	} {
		if status, e, _ := u.call(t, c.method, c.path, "", ""); status != http.StatusNotFound {
			t.Errorf("%s %s: %d (%s), want 404", c.method, c.path, status, e.Error)
		}
	}
	// A path of the API with a method it does not take.
	for _, c := range []struct{ method, path, allow string }{
		{http.MethodPut, "/v1/vms", "GET, POST"},
		{http.MethodPatch, "/v1/vms/0123456789ab", "GET, DELETE"},
		{http.MethodPost, "/v1/bases", "GET"},
	} {
		if status, e, _ := u.call(t, c.method, c.path, "", ""); status != http.StatusMethodNotAllowed || !strings.Contains(e.Error, c.allow) {
			t.Errorf("%s %s: %d (%s), want 405 naming %s", c.method, c.path, status, e.Error, c.allow)
		}
	}
}

func TestUnservedOverlayIsNamedWithoutItsPassword(t *testing.T) {
	u := start(t, cloudlet.Options{FetchTimeout: 5 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := u.client.Create(ctx, cloudlet.Request{Overlay: "http://alice:s3cr3t-pw@127.0.0.1:1/x.overlay"})
	ae := apiError(t, "an overlay nobody serves", err, 502, "overlay")
	if !strings.Contains(ae.Msg, "127.0.0.1:1/x.overlay") {
		t.Errorf("message %q does not name the overlay", ae.Msg)
	}
	if strings.Contains(ae.Msg, "s3cr3t-pw") || strings.Contains(err.Error(), "s3cr3t-pw") {
		t.Errorf("message %q shows the URL's password", ae.Msg)
	}

	// A server that answers 404 will not serve it later either: 400.
	srv := serveOverlays(t, nil)
	_, err = u.client.Create(ctx, cloudlet.Request{Overlay: srv.URL + "/gone.overlay", Headers: map[string]string{"X-Key": "k-91ab"}})
	ae = apiError(t, "an overlay the server does not have", err, 400, "overlay")
	if !strings.Contains(ae.Msg, "/gone.overlay") || strings.Contains(ae.Msg, "k-91ab") {
		t.Errorf("message %q: want the overlay named and the header's value not", ae.Msg)
	}

	// Something that is not an overlay.
	srv = serveOverlays(t, map[string][]byte{"/page.html": []byte(strings.Repeat("<html>", 100))})
	_, err = u.client.Create(ctx, cloudlet.Request{Overlay: srv.URL + "/page.html"})
	ae = apiError(t, "not an overlay", err, 400, "overlay")
	if !strings.Contains(ae.Msg, "not a cloudletfs overlay") {
		t.Errorf("message %q does not say the file is not an overlay", ae.Msg)
	}
}

func TestOverlayOfAnotherBaseIs422(t *testing.T) {
	u := start(t, cloudlet.Options{})
	// The overlay's base is in another store, not this cloudlet's.
	elsewhere := t.TempDir()
	other := importBase(t, elsewhere, "other", baseFiles(t, t.TempDir(), 1, true))
	foreign := buildOverlay(t, elsewhere, other, 1)
	// This cloudlet holds a base, but one without a vm.json.
	bare := importBase(t, u.opt.StateDir, "bare", baseFiles(t, t.TempDir(), 2, false))
	unrunnable := buildOverlay(t, u.opt.StateDir, bare, 2)
	srv := serveOverlays(t, map[string][]byte{"/foreign.overlay": foreign, "/bare.overlay": unrunnable})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	_, err := u.client.Create(ctx, cloudlet.Request{Overlay: srv.URL + "/foreign.overlay"})
	ae := apiError(t, "an overlay of a base the cloudlet lacks", err, 422, "overlay")
	if !strings.Contains(ae.Msg, other.ID.Short()) || !strings.Contains(ae.Msg, "does not hold") {
		t.Errorf("message %q: want it to name base %s and say it is not held", ae.Msg, other.ID.Short())
	}
	_, err = u.client.Create(ctx, cloudlet.Request{Overlay: srv.URL + "/bare.overlay"})
	ae = apiError(t, "an overlay of a base without vm.json", err, 422, "overlay")
	if !strings.Contains(ae.Msg, "bare") || !strings.Contains(ae.Msg, "vm.json") {
		t.Errorf("message %q: want it to name base bare and its missing vm.json", ae.Msg)
	}
	if vms, err := u.client.List(ctx); err != nil || len(vms) != 0 {
		t.Fatalf("after refused requests the cloudlet lists %v (%v), want no VMs", vms, err)
	}
	bases, err := u.client.Bases(ctx)
	if err != nil || len(bases) != 1 || bases[0].Name != "bare" || bases[0].Runnable || bases[0].MemoryBytes != memSize {
		t.Fatalf("bases: %+v (%v), want the one unrunnable base bare", bases, err)
	}
}

// scrape reads the service's metrics.
func scrape(t *testing.T, u *cloudletUnderTest) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(u.srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// vmsByState reads the cloudletfs_vms gauge, failing unless it has one
// series for each state.
func vmsByState(t *testing.T, fams map[string]*dto.MetricFamily) map[cloudlet.State]float64 {
	t.Helper()
	f := fams["cloudletfs_vms"]
	if f == nil || f.GetType() != dto.MetricType_GAUGE {
		t.Fatalf("no gauge cloudletfs_vms in the metrics: %v", f)
	}
	got := map[cloudlet.State]float64{}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "state" {
				got[cloudlet.State(l.GetValue())] = m.GetGauge().GetValue()
			}
		}
	}
	if len(got) != len(cloudlet.States) || len(f.GetMetric()) != len(cloudlet.States) {
		t.Fatalf("cloudletfs_vms has series %v, want one for each of %v", got, cloudlet.States)
	}
	for _, s := range cloudlet.States {
		if _, ok := got[s]; !ok {
			t.Fatalf("cloudletfs_vms has no series for state %s: %v", s, got)
		}
	}
	return got
}

func TestMetricsOfAFreshService(t *testing.T) {
	u := start(t, cloudlet.Options{})
	fams := scrape(t, u)
	for s, n := range vmsByState(t, fams) {
		if n != 0 {
			t.Errorf("cloudletfs_vms{state=%q} = %v on a fresh service, want 0", s, n)
		}
	}
	for _, name := range []string{"cloudletfs_vm_resume_seconds", "cloudletfs_vm_first_response_seconds"} {
		f := fams[name]
		if f == nil || f.GetType() != dto.MetricType_HISTOGRAM || len(f.GetMetric()) != 1 {
			t.Fatalf("no histogram %s in the metrics: %v", name, f)
		}
		if h := f.GetMetric()[0].GetHistogram(); h.GetSampleCount() != 0 || len(h.GetBucket()) == 0 {
			t.Errorf("%s on a fresh service: %d samples, %d buckets; want 0 samples in some buckets", name, h.GetSampleCount(), len(h.GetBucket()))
		}
	}
	if f := fams["cloudletfs_vm_requests_total"]; f == nil || f.GetMetric()[0].GetCounter().GetValue() != 0 {
		t.Errorf("cloudletfs_vm_requests_total on a fresh service: %v, want 0", f)
	}
}

func TestStatusPage(t *testing.T) {
	u := start(t, cloudlet.Options{})
	importBase(t, u.opt.StateDir, "debian-min", baseFiles(t, t.TempDir(), 3, true))
	resp, err := http.Get(u.srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %s, Content-Type %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	page := string(b)
	for _, want := range []string{"<h1>Cloudlet</h1>", "No VMs yet", `<table id="bases">`, "debian-min", `http-equiv="refresh"`} {
		if !strings.Contains(page, want) {
			t.Errorf("the status page lacks %q:\n%s", want, page)
		}
	}
}

func TestStatusPageInABrowser(t *testing.T) {
	u := start(t, cloudlet.Options{})
	url := runnable(t, u.opt.StateDir, 1)[0]
	b := browser.New(t)
	b.Open(t, u.srv.URL+"/")
	if h := b.Text(t, "h1"); h != "Cloudlet" {
		t.Errorf("heading %q, want Cloudlet", h)
	}
	b.WaitText(t, "#no-vms", "No VMs yet", 10*time.Second)
	bases := b.WaitText(t, "#bases", "base", 10*time.Second)
	if !strings.Contains(bases, "256 KiB") || !strings.Contains(bases, "yes") {
		t.Errorf("the bases table reads %q: want the base's 256 KiB of memory and that it is runnable", bases)
	}

	// A VM that comes and fails shows on the open page, which loads
	// itself again.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := u.client.Create(ctx, cloudlet.Request{Overlay: url})
	if err != nil {
		t.Fatalf("admitting a VM: %v", err)
	}
	follow(t, u.client, v.ID, 30*time.Second)
	row := b.WaitText(t, "#vm-"+v.ID, "failed", 15*time.Second)
	if !strings.Contains(row, "its worker process died") || !strings.Contains(row, "/vm-1.overlay") {
		t.Errorf("the VM's row reads %q: want its overlay and why it failed", row)
	}
	if s := b.Text(t, "#summary"); !strings.HasPrefix(s, "1 VMs, 0 running or starting") {
		t.Errorf("summary %q: want 1 VM, none running", s)
	}
}

// A web page can post a form but not JSON, and without a token only
// requests to an IP address or localhost are served: a page the
// cloudlet's own browser loads cannot ask for VMs.
func TestRequestsFromWebPagesAreRefused(t *testing.T) {
	u := start(t, cloudlet.Options{})
	post := func(ct, host string) int {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, u.srv.URL+"/v1/vms", strings.NewReader(`{"overlay": "ftp://x/y"}`))
		if err != nil {
			t.Fatal(err)
		}
		if ct != "" {
			req.Header.Set("Content-Type", ct)
		}
		if host != "" {
			req.Host = host
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"} {
		if got := post(ct, ""); got != http.StatusUnsupportedMediaType {
			t.Errorf("Content-Type %q: %d, want 415", ct, got)
		}
	}
	// The JSON reaches validation: the ftp:// overlay is refused there.
	if got := post("application/json; charset=utf-8", ""); got != http.StatusBadRequest {
		t.Errorf("JSON: %d, want 400", got)
	}
	for host, want := range map[string]int{"evil.example": 403, "evil.example:8021": 403, "localhost:8021": 400, "[::1]:8021": 400} {
		if got := post("application/json", host); got != want {
			t.Errorf("Host %s: %d, want %d", host, got, want)
		}
	}
	// With a token, the token is the guard, whatever the name.
	v := start(t, cloudlet.Options{Token: "tok"})
	req, _ := http.NewRequest(http.MethodGet, v.srv.URL+"/v1/vms", nil)
	req.Host = "cloudlet.example"
	req.Header.Set("Authorization", "bearer tok") // the scheme in any case
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("a named host with the token, scheme in lower case: %d, want 200", resp.StatusCode)
	}
}
