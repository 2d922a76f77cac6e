package cloudlet

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// A handoff moves a running VM from this cloudlet (the source) to another
// (the destination). The source's worker owns it: it readies the
// destination (POST /v1/handoffs), runs the rounds, pushing segments there
// (PUT /v1/handoffs/{id}/segments/{sha}), writes the layer, asks the
// destination for a VM of it (POST /v1/vms with "handoff"), and once that
// runs quits QEMU here and waits for it to be complete. The daemon serves
// the layer at /v1/handoffs/{id}/layer.overlay meanwhile: the ID, 128
// random bits, is the capability. If anything fails before the
// destination runs the VM, the VM runs on here and the destination is told
// to drop what it holds (DELETE /v1/handoffs/{id}).

// workerHandoff is what the daemon tells a worker to start a handoff.
type workerHandoff struct {
	ID       string `json:"id"`
	To       string `json:"to"`
	Token    string `json:"token,omitempty"`
	LayerURL string `json:"layer_url"`
	From     string `json:"from"`
}

var handoffID = regexp.MustCompile(`^[0-9a-f]{32}$`)

func newHandoffID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// Handoff starts moving VM id to the cloudlet hr names. self is this
// cloudlet's URL as the destination reaches it.
func (s *Service) Handoff(ctx context.Context, id string, hr HandoffRequest, self string) (VM, error) {
	e := s.lookup(id)
	if e == nil {
		return VM{}, notFound(id)
	}
	if hr.To == "" {
		return VM{}, badRequest("to", "missing: give the destination cloudlet's URL, such as http://cloudlet-b:8021")
	}
	if _, err := NewClient(hr.To, hr.Token); err != nil {
		return VM{}, badRequest("to", "%q is not a cloudlet's URL (want http://HOST:PORT)", hr.To)
	}
	if strings.TrimSuffix(hr.To, "/") == strings.TrimSuffix(self, "/") {
		return VM{}, badRequest("to", "%s is this cloudlet", hr.To)
	}
	v, _ := e.snapshot()
	switch v.State {
	case Running, FirstResponse, Complete:
	default:
		return VM{}, &RequestError{Status: 409, Msg: fmt.Sprintf("VM %s is %s: only a running VM can be handed off", id, v.State)}
	}
	if h := v.Handoff; h != nil && h.From != "" {
		return VM{}, &RequestError{Status: 409, Msg: fmt.Sprintf("VM %s came here by a handoff from %s: handing a VM on a second time is not supported yet (its layer would need the first one, which %s lets go once this cloudlet has it)", id, h.From, h.From)}
	}
	if h := v.Handoff; h != nil && h.Phase != HandoffFailed {
		return VM{}, &RequestError{Status: 409, Msg: fmt.Sprintf("VM %s is being handed off already (to %s)", id, h.To)}
	}
	if loopback(self) && !loopback(hr.To) {
		return VM{}, badRequest("to", "this cloudlet was asked at %s, which %s cannot reach: start it with --advertise URL, the URL other cloudlets reach it at", self, hr.To)
	}
	hid, err := newHandoffID()
	if err != nil {
		return VM{}, err
	}
	body, _ := json.Marshal(workerHandoff{ID: hid, To: hr.To, Token: hr.Token, From: self,
		LayerURL: strings.TrimSuffix(self, "/") + "/v1/handoffs/layer.overlay?signature=" + hid})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://worker/handoff", strings.NewReader(string(body)))
	if err != nil {
		return VM{}, err
	}
	c := workerClient(e.rec.Dir)
	defer c.CloseIdleConnections()
	resp, err := c.Do(req)
	if err != nil {
		return VM{}, &RequestError{Status: 503, Msg: fmt.Sprintf("VM %s: its worker does not answer: %v", id, err)}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return VM{}, &RequestError{Status: 409, Msg: strings.TrimSpace(string(msg))}
	}
	s.log.Info().Str("vm", id).Str("to", hr.To).Str("handoff", hid).Msg("handing a VM off")
	// The worker's report with the handoff follows; wait for it briefly
	// so that the reply shows it.
	deadline := time.After(2 * time.Second)
	for {
		v, changed := e.snapshot()
		if v.Handoff != nil && v.Handoff.ID == hid {
			return v, nil
		}
		select {
		case <-changed:
		case <-deadline:
			return v, nil
		case <-ctx.Done():
			return v, ctx.Err()
		}
	}
}

// loopback reports whether a cloudlet's URL names this machine only.
func loopback(u string) bool {
	pu, err := url.Parse(u)
	if err != nil {
		return false
	}
	h := pu.Hostname()
	ip := net.ParseIP(h)
	return h == "localhost" || ip != nil && ip.IsLoopback()
}

// layerPath returns the layer of the handoff hid, if a VM here is its
// source.
func (s *Service) layerPath(hid string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.vms {
		e.mu.Lock()
		h, dir := e.rec.VM.Handoff, e.rec.Dir
		e.mu.Unlock()
		// Served from the stop to the destination's having it all, or
		// the VM's end if it never does: not once the handoff failed.
		if h != nil && h.ID == hid && h.To != "" && h.Phase != HandoffFailed && h.Phase != HandoffSending {
			return filepath.Join(dir, handoffDir, "layer.overlay")
		}
	}
	return ""
}

// handoffDir is where, in a VM's directory, its worker keeps a handoff's
// files.
const handoffDir = "handoff"

// stagedDir is where a destination keeps a handoff's segments.
func (s *Service) stagedDir(hid string) string {
	return filepath.Join(s.opt.StateDir, "cloudlet", "handoffs", hid)
}

func (s *Service) serveLayer(w http.ResponseWriter, r *http.Request) {
	hid := r.URL.Query().Get("signature")
	p := ""
	if handoffID.MatchString(hid) {
		p = s.layerPath(hid)
	}
	f, err := os.Open(p)
	if p == "" || err != nil {
		writeError(w, &RequestError{Status: 404, Msg: "no such handoff layer here, or not yet written"})
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, "layer.overlay", st.ModTime(), f)
}

func (s *Service) prepareHandoff(w http.ResponseWriter, r *http.Request) {
	var p HandoffPrepare
	if !decodeJSON(w, r, &p, "id, base and from") {
		return
	}
	if !handoffID.MatchString(p.ID) {
		writeError(w, badRequest("id", "want 32 hex digits"))
		return
	}
	d, err := overlay.ParseDigest(p.Base)
	if err != nil {
		writeError(w, badRequest("base", "want a base ID"))
		return
	}
	st, err := store.Open(s.opt.StateDir, s.log)
	if err != nil {
		writeError(w, err)
		return
	}
	base, err := st.Resolve(d.String())
	st.Close()
	if err != nil {
		writeError(w, &RequestError{Status: 422, Field: "base", Msg: fmt.Sprintf("this cloudlet does not hold base %s: the VM cannot be handed off here", d.Short())})
		return
	}
	if base.VMConfig == nil {
		writeError(w, &RequestError{Status: 422, Field: "base", Msg: fmt.Sprintf("base %s has no vm.json here, so this cloudlet cannot run VMs of it", base.Name)})
		return
	}
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		writeError(w, &RequestError{Status: 503, Msg: "the cloudlet is shutting down"})
		return
	}
	if err := os.MkdirAll(s.stagedDir(p.ID), 0o700); err != nil {
		writeError(w, err)
		return
	}
	s.log.Info().Str("handoff", p.ID).Str("from", p.From).Str("base", base.Name).Msg("a VM is being handed off here")
	w.WriteHeader(http.StatusCreated)
}

func (s *Service) putSegment(w http.ResponseWriter, r *http.Request) {
	hid, sha := r.PathValue("hid"), r.PathValue("sha")
	want, err := overlay.ParseDigest(sha)
	if !handoffID.MatchString(hid) || err != nil {
		writeError(w, &RequestError{Status: 404, Msg: "want /v1/handoffs/ID/segments/SHA256"})
		return
	}
	dir := s.stagedDir(hid)
	if _, err := os.Stat(dir); err != nil {
		writeError(w, &RequestError{Status: 404, Msg: fmt.Sprintf("no handoff %s is being prepared here (POST /v1/handoffs first)", hid)})
		return
	}
	f, err := os.CreateTemp(dir, ".segment-*")
	if err != nil {
		writeError(w, err)
		return
	}
	defer os.Remove(f.Name())
	defer f.Close()
	hash := sha256.New()
	_, err = io.Copy(io.MultiWriter(f, hash), http.MaxBytesReader(w, r.Body, overlay.MaxSegmentRaw+(1<<20)))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, &RequestError{Status: 413, Msg: "larger than any segment can be"})
			return
		}
		writeError(w, &RequestError{Status: 400, Msg: "the segment was cut short: " + err.Error()})
		return
	}
	if got := hash.Sum(nil); !strings.EqualFold(hex.EncodeToString(got), want.String()) {
		writeError(w, badRequest("", "the segment's sha256 is %x, not %s", got, want))
		return
	}
	if err := f.Close(); err != nil {
		writeError(w, err)
		return
	}
	if err := os.Rename(f.Name(), filepath.Join(dir, want.String())); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Service) deleteHandoff(w http.ResponseWriter, r *http.Request) {
	hid := r.PathValue("hid")
	if !handoffID.MatchString(hid) {
		writeError(w, &RequestError{Status: 404, Msg: "want /v1/handoffs/ID"})
		return
	}
	var stop []string
	s.mu.Lock()
	// A VM of it asked for from now on is refused (see Create).
	s.dropped[hid] = true
	for id, e := range s.vms {
		e.mu.Lock()
		if h := e.rec.VM.Handoff; h != nil && h.ID == hid && h.From != "" && !e.rec.VM.State.Final() {
			stop = append(stop, id)
		}
		e.mu.Unlock()
	}
	s.mu.Unlock()
	for _, id := range stop {
		// The source resumes the VM only once this says it is gone.
		if _, err := s.Stop(r.Context(), id); err != nil {
			s.log.Warn().Err(err).Str("vm", id).Msg("stopping the VM of a handoff given up")
			writeError(w, &RequestError{Status: 503, Msg: fmt.Sprintf("VM %s of the handoff did not stop: %v", id, err)})
			return
		}
	}
	os.RemoveAll(s.stagedDir(hid))
	w.WriteHeader(http.StatusNoContent)
}

func (s *Service) postHandoff(w http.ResponseWriter, r *http.Request) {
	var hr HandoffRequest
	if !decodeJSON(w, r, &hr, "to and token") {
		return
	}
	self := s.opt.Advertise
	if self == "" {
		self = "http://" + r.Host
	}
	v, err := s.Handoff(r.Context(), r.PathValue("id"), hr, self)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, v)
}
