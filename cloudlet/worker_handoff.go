package cloudlet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/handoff"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// handoffDone is a handoff whose destination runs the VM.
type handoffDone struct {
	id, to, vm string
	dest       *Client
	start      time.Time
}

// How long a destination may take to run the VM once asked, and to have
// all of it once it runs.
const (
	destRunTimeout      = 2 * time.Minute
	destCompleteTimeout = 15 * time.Minute
)

// startHandoff is POST /handoff on the worker's socket: the daemon asks
// for a handoff; it runs in the background.
func (w *worker) startHandoff(rw http.ResponseWriter, r *http.Request) {
	var req workerHandoff
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(rw, "bad handoff request: "+err.Error(), http.StatusBadRequest)
		return
	}
	w.mu.Lock()
	switch {
	case w.vm == nil || w.sess == nil:
		w.mu.Unlock()
		http.Error(rw, "the VM does not run yet", http.StatusConflict)
		return
	case w.handing || w.moved != nil:
		w.mu.Unlock()
		http.Error(rw, "the VM is being handed off already", http.StatusConflict)
		return
	case w.ended:
		w.mu.Unlock()
		http.Error(rw, "the VM has ended", http.StatusConflict)
		return
	}
	w.handing = true
	w.mu.Unlock()
	go w.handoff(req)
	rw.WriteHeader(http.StatusAccepted)
}

// handoff runs one handoff to its end: the VM runs elsewhere (w.moved),
// or on here, with the reason it did not move.
func (w *worker) handoff(req workerHandoff) {
	ctx := w.runCtx
	start := time.Now()
	w.update(func(r *report) {
		r.VM.Handoff = &Handoff{ID: req.ID, To: req.To, Phase: HandoffSending, Timeline: []Step{}}
	})
	step := func(name, text string, f func(h *Handoff)) {
		w.update(func(r *report) {
			h := r.VM.Handoff
			h.Timeline = append(h.Timeline, Step{At: time.Since(start).Seconds(), Step: name, Text: text})
			if f != nil {
				f(h)
			}
		})
	}
	w.mu.Lock()
	vm, sess := w.vm, w.sess
	w.mu.Unlock()
	dest, _ := NewClient(req.To, req.Token)
	// fail ends a handoff that did not reach the destination's running
	// VM. The VM runs on here, unless the destination was asked for a VM
	// and does not confirm it dropped it: the VM must never run twice, so
	// it then stays stopped here, and the reason says so.
	fail := func(err error, resume, created bool) {
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		derr := dest.DeleteHandoff(dctx, req.ID)
		cancel()
		if derr != nil {
			w.log.Warn().Err(derr).Str("to", req.To).Msg("could not tell the destination to drop the handoff")
		}
		where := "the VM runs on here"
		if resume && created && derr != nil {
			resume = false
			where = "the VM stays stopped here: the destination was asked to run it and did not confirm it dropped it (" + oneLine(derr.Error()) + "); stop it here once you know it runs there, or stop it there first"
		}
		if resume {
			actx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			if aerr := handoff.Abort(actx, vm); aerr != nil {
				w.log.Error().Err(aerr).Msg("handoff failed, and the VM could not be let run again")
				where = "the VM could not be let run again here: " + oneLine(aerr.Error())
			}
			cancel()
		}
		w.log.Warn().Err(err).Str("to", req.To).Msg("handoff failed: " + where)
		step(HandoffFailed, where+": "+oneLine(err.Error()), func(h *Handoff) { h.Phase, h.Reason = HandoffFailed, oneLine(err.Error())+"; "+where })
		w.mu.Lock()
		w.handing = false
		w.mu.Unlock()
	}
	step("requested", "handing off to "+req.To, nil)
	if len(w.sp.Request.Headers) > 0 || fetch.Redact(w.sp.Request.Overlay) != w.sp.Request.Overlay {
		fail(errors.New("the VM's overlay is fetched with credentials (headers, a password or a signed URL), which its layer would hand the destination: handing off such a VM is not supported"), false, false)
		return
	}
	if err := dest.PrepareHandoff(ctx, HandoffPrepare{ID: req.ID, Base: sess.Overlay.Header.BaseID.String(), From: req.From}); err != nil {
		fail(fmt.Errorf("the destination refused the handoff: %w", err), false, false)
		return
	}
	res, err := handoff.Send(ctx, handoff.Options{
		VM: vm, Session: sess, Dir: filepath.Join(w.dir, handoffDir),
		ParentLocation: w.sp.Request.Overlay,
		Push: func(ctx context.Context, sha overlay.Digest, stored []byte) error {
			return dest.PutSegment(ctx, req.ID, sha.String(), stored)
		},
		Events: func(e handoff.Event) {
			step(e.Step, e.Text, func(h *Handoff) {
				if e.Step == handoff.StepRound || e.Step == handoff.StepStopped {
					h.Rounds = max(h.Rounds, e.Round)
				}
				if e.Step == handoff.StepStopped {
					h.Phase = HandoffResuming
				}
			})
		},
		Log: w.log,
	})
	if err != nil {
		// Send lets the VM run again itself.
		fail(fmt.Errorf("sending the VM: %w", err), false, false)
		return
	}
	w.update(func(r *report) {
		h := r.VM.Handoff
		h.Rounds, h.PushedBytes, h.LayerBytes, h.MetadataBytes, h.FinalBytes = res.Rounds, res.PushedBytes, res.LayerBytes, res.MetadataBytes, res.FinalBytes
	})
	bv, err := dest.Create(ctx, Request{Overlay: req.LayerURL, Ports: w.sp.Request.Ports, Probe: w.sp.Request.Probe, Handoff: req.ID, From: req.From})
	if err != nil {
		// A refusal is an answer; no answer may hide a VM admitted.
		var ae *APIError
		fail(fmt.Errorf("the destination did not take the VM: %w", err), true, !errors.As(err, &ae))
		return
	}
	step("dest-created", fmt.Sprintf("the destination admitted it as VM %s and fetches the layer's metadata", bv.ID), func(h *Handoff) { h.DestVM = bv.ID })
	fctx, cancel := context.WithTimeout(ctx, destRunTimeout)
	last, err := dest.Follow(fctx, bv.ID, func(v VM) bool {
		return v.State != Running && v.State != FirstResponse && v.State != Complete
	})
	cancel()
	if s := last.State; s != Running && s != FirstResponse && s != Complete {
		why := fmt.Sprintf("the destination's VM %s is %s", bv.ID, s)
		if last.Reason != "" {
			why += ": " + last.Reason
		}
		if err != nil {
			why += fmt.Sprintf(" (%v)", err)
		}
		fail(fmt.Errorf("%s", why), true, true)
		return
	}
	down := time.Since(res.Stopped)
	step("dest-running", fmt.Sprintf("the destination runs the VM: downtime %.2f s; it fetches the rest from here", down.Seconds()), func(h *Handoff) {
		h.Phase, h.DowntimeS, h.DestPorts = HandoffRunning, down.Seconds(), last.Ports
	})
	w.mu.Lock()
	w.moved = &handoffDone{id: req.ID, to: req.To, vm: bv.ID, dest: dest, start: start}
	w.handing = false
	w.mu.Unlock()
	// QEMU quits and the mount goes; the layer stays, for the daemon to
	// serve until the destination has all of it.
	w.stopRun()
}

// awaitComplete waits, once QEMU has quit here, for the destination to
// have every chunk of the VM: until then it may fetch from this
// cloudlet's layer.
func (w *worker) awaitComplete(ctx context.Context, m *handoffDone) {
	step := func(name, text string, f func(h *Handoff)) {
		w.update(func(r *report) {
			h := r.VM.Handoff
			h.Timeline = append(h.Timeline, Step{At: time.Since(m.start).Seconds(), Step: name, Text: text})
			if f != nil {
				f(h)
			}
		})
	}
	fctx, cancel := context.WithTimeout(ctx, destCompleteTimeout)
	defer cancel()
	// The layer's own segments: the VM's overlay and its parents come
	// from their own URLs, not from here.
	has := func(v VM) bool { return v.Stats != nil && v.Stats.SegmentsPresent == v.Stats.Segments }
	last, err := m.dest.Follow(fctx, m.vm, func(v VM) bool { return !has(v) })
	if has(last) {
		step("dest-complete", fmt.Sprintf("the destination has all of the layer (%s fetched there); this cloudlet lets the VM go", humanize.IBytes(uint64(last.Stats.BytesFetched))), func(h *Handoff) { h.Phase = HandoffComplete })
		return
	}
	why := fmt.Sprintf("the destination's VM is %s", last.State)
	if err != nil {
		why += fmt.Sprintf(" (%v)", err)
	}
	// Still running: the layer stays, served, until the VM is forgotten
	// here.
	step("dest-incomplete", "stopped waiting for the destination to have all of the layer, which this cloudlet serves until the VM is forgotten: "+why, func(h *Handoff) { h.Reason = why })
}
