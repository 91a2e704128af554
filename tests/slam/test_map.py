"""The shared map: snapshots, retiring keyframes, and reads while another thread writes."""

from __future__ import annotations

import threading

import numpy as np
import torch

from slam.map import FrameState, Keyframe, Map
from v2d.geometry.lie import matrix_to_quat, quat_to_matrix, se3_exp, se3_identity, se3_inv, se3_mul

H, W = 8, 12


def _pose(tx: float) -> torch.Tensor:
    p = se3_identity(dtype=torch.float64)
    p[0] = tx
    return p


def _map_with_keyframe() -> Map:
    m = Map(torch.tensor([10.0, 10.0, 6.0, 4.0]), torch.device("cpu"))
    ident = se3_identity(dtype=torch.float64)
    m.add_frame(FrameState(keyframe=0, rel_cw=ident), np.zeros((H, W, 3), np.uint8))
    m.add_keyframe(Keyframe(frame=0, pose_cw=ident, image=np.zeros((H, W, 3), np.uint8), depth=torch.ones(H, W),
                            valid=torch.ones(H, W, dtype=torch.bool)), 0)
    return m


def test_frames_follow_their_keyframe():
    m = _map_with_keyframe()
    m.add_frame(FrameState(keyframe=0, rel_cw=_pose(0.5)), np.zeros((H, W, 3), np.uint8))
    m.update_keyframe(0, pose_cw=_pose(2.0))
    assert torch.allclose(m.frame_pose(1), se3_mul(_pose(0.5), _pose(2.0)))
    assert torch.allclose(m.frame_poses()[1], m.frame_pose(1))
    m.move_frame(1, _pose(7.0))  # a world pose, stored relative to the keyframe
    assert torch.allclose(m.frame(1).rel_cw, se3_mul(_pose(7.0), se3_inv(_pose(2.0))))
    assert torch.allclose(m.frame_pose(1), _pose(7.0))


def test_keyframes_newer_than_the_optimised_ones_move_with_the_newest():
    """In concurrent mode the tracker makes keyframe 2 while the mapper optimises 0 and 1: when 1
    moves, 2 keeps its pose relative to 1 (and frames tracked against 2 follow it)."""
    m = _map_with_keyframe()
    for f, tx in ((1, 1.0), (2, 2.0)):
        m.add_frame(FrameState(keyframe=0, rel_cw=_pose(tx)), np.zeros((H, W, 3), np.uint8))
        m.add_keyframe(Keyframe(frame=f, pose_cw=_pose(tx), image=np.zeros((H, W, 3), np.uint8),
                                depth=torch.ones(H, W), valid=torch.ones(H, W, dtype=torch.bool)), f)
    turn = se3_exp(torch.tensor([0.1, 0.2, -0.3, 0.2, -0.1, 0.3], dtype=torch.float64))  # order matters
    m.update_keyframe(2, pose_cw=se3_mul(turn, _pose(2.0)))
    rel_2_1 = se3_mul(m.keyframe(2).pose_cw, se3_inv(m.keyframe(1).pose_cw))
    new_1 = se3_mul(se3_inv(turn), _pose(1.0))
    m.set_keyframe_poses({1: new_1})
    assert torch.allclose(m.keyframe(1).pose_cw, new_1)
    assert torch.allclose(se3_mul(m.keyframe(2).pose_cw, se3_inv(m.keyframe(1).pose_cw)), rel_2_1)
    assert torch.allclose(m.keyframe(0).pose_cw, se3_identity(dtype=torch.float64))  # older ones stay


def test_snapshots_do_not_change_under_their_reader():
    m = _map_with_keyframe()
    kf = m.keyframe(0)
    m.update_keyframe(0, pose_cw=_pose(3.0), depth=torch.full((H, W), 5.0))
    assert float(kf.pose_cw[0]) == 0.0 and float(kf.depth[0, 0]) == 1.0
    assert float(m.keyframe(0).pose_cw[0]) == 3.0


def test_a_lost_frame_holds_the_last_good_pose_and_recent_poses_are_read_together():
    m = _map_with_keyframe()
    m.add_frame(FrameState(keyframe=0, rel_cw=_pose(0.5)), np.zeros((H, W, 3), np.uint8))
    f = m.add_frame(FrameState(keyframe=0, rel_cw=_pose(9.0), lost=True), np.zeros((H, W, 3), np.uint8))
    assert torch.allclose(m.frame_pose(f), m.frame_pose(1))  # not the lost frame's own estimate
    f = m.add_frame(FrameState(keyframe=0, rel_cw=_pose(7.0), lost=True), np.zeros((H, W, 3), np.uint8))
    assert torch.allclose(m.frame_pose(f), m.frame_pose(1))
    assert torch.allclose(m.recent_poses(2), torch.stack([m.frame_pose(2), m.frame_pose(3)]))
    assert m.recent_poses(10).shape == (4, 7)
    m.drop_last_frame()
    m.drop_last_frame()
    m.drop_last_frame()  # frame 1, the last good one, goes too: frame 0 is the last good now
    f = m.add_frame(FrameState(keyframe=0, rel_cw=_pose(7.0), lost=True), np.zeros((H, W, 3), np.uint8))
    assert torch.allclose(m.frame_pose(f), m.frame_pose(0))


def test_retire_hands_out_the_final_depth_once_and_keeps_a_strided_copy():
    m = _map_with_keyframe()
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[0, 0] = False
    m.update_keyframe(0, depth=torch.full((H, W), 2.0), valid=valid)
    m.set_edges([(0, 0)])
    handed: list[tuple[int, np.ndarray]] = []
    assert m.retire(0, 2, lambda f, d, p, im, n: handed.append((f, d)))
    assert not m.retire(0, 2, lambda f, d, p, im, n: handed.append((f, d)))  # only once
    assert [f for f, _ in handed] == [0]
    depth = handed[0][1]
    assert depth.dtype == np.float32 and depth[0, 0] == 0.0 and (depth[1:] == 2.0).all()
    kf = m.keyframe(0)
    assert kf.image is None and kf.depth is None and kf.small_depth.shape == (H // 2, W // 2)
    assert m.window() == [] and m.edges() == set()


def test_image_buffer_is_trimmed_to_the_window_and_its_bound():
    m = _map_with_keyframe()
    for _ in range(1, 10):
        m.add_frame(FrameState(keyframe=0, rel_cw=se3_identity(dtype=torch.float64)), np.zeros((H, W, 3), np.uint8))
    m.trim_images(4)
    assert list(m.images()) == [6, 7, 8, 9]
    m.add_keyframe(Keyframe(frame=8, pose_cw=se3_identity(dtype=torch.float64), image=np.zeros((H, W, 3), np.uint8),
                            depth=torch.ones(H, W), valid=torch.ones(H, W, dtype=torch.bool)), 8)
    m.retire(0, 2)
    m.trim_images(4)
    assert list(m.images()) == [8, 9]  # older than the window's oldest keyframe


def test_reads_while_another_thread_adds_updates_and_retires_keyframes():
    """A writer adds frames and keyframes, moves them and retires old ones (as tracker and mapper
    do) while a reader takes snapshots: every snapshot is consistent (a keyframe's depth and pose
    were written together) and nothing raises."""
    m = _map_with_keyframe()
    m.update_keyframe(0, pose_cw=_pose(1.0))  # depth 1 everywhere: consistent like every later write
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]
    read_done = threading.Semaphore(0)  # the writer waits for a read every 10 writes: they interleave

    def writer() -> None:
        try:
            for i in range(1, 300):
                f = m.add_frame(FrameState(keyframe=m.window()[-1], rel_cw=_pose(0.01)),
                                np.zeros((H, W, 3), np.uint8))
                if i % 5 == 0:
                    kid = m.add_keyframe(Keyframe(frame=f, pose_cw=_pose(float(i)), image=np.zeros((H, W, 3), np.uint8),
                                                  depth=torch.full((H, W), float(i)),
                                                  valid=torch.ones(H, W, dtype=torch.bool)), f)
                    for k in m.window():  # the mapper moves the window: depth and pose together
                        v = float(torch.rand(()))
                        m.update_keyframe(k, pose_cw=_pose(v), depth=torch.full((H, W), v))
                    while len(m.window()) > 3:
                        m.retire(m.window()[0], 2)
                    m.set_edges((a, b) for a in m.window() for b in m.window() if a != b)
                    assert kid == m.num_keyframes() - 1
                m.trim_images(8)
                if i % 10 == 0:
                    assert read_done.acquire(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            stop.set()

    def reader() -> None:
        try:
            while not stop.is_set():
                ref = m.reference()
                assert float(ref.depth[0, 0]) == float(ref.pose_cw[0])
                for kf in m.keyframes(m.window()):
                    if kf.depth is not None:
                        assert float(kf.depth[0, 0]) == float(kf.pose_cw[0])
                poses = m.frame_poses()
                assert poses.shape[0] >= 1 and torch.isfinite(poses).all()
                reads[0] += 1
                read_done.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert reads[0] >= 29
    assert m.num_frames() == 300 and len(m.window()) <= 3
    assert len(m.images()) <= 8


def test_a_lost_run_is_bridged_between_its_tracked_neighbours():
    m = _map_with_keyframe()
    img = np.zeros((H, W, 3), np.uint8)
    m.add_frame(FrameState(keyframe=0, rel_cw=_pose(1.0)), img)  # frame 1 tracked at x = 1
    for _ in range(3):  # frames 2-4 lost: they hold frame 1's pose
        m.add_frame(FrameState(keyframe=0, rel_cw=_pose(99.0), lost=True), img)
    assert torch.allclose(m.frame_pose(3), _pose(1.0))
    m.add_frame(FrameState(keyframe=0, rel_cw=_pose(5.0)), img)  # frame 5 tracked again at x = 5
    assert m.bridge(5) == [2, 3, 4]
    for f, x in ((2, 2.0), (3, 3.0), (4, 4.0)):  # constant velocity across the gap
        assert torch.allclose(m.frame_pose(f), _pose(x), atol=1e-9)
        assert m.frame(f).interpolated and not m.frame(f).lost
    assert m.bridge(5) == []  # nothing left to bridge


def test_no_bridge_across_a_restart_until_the_segments_are_merged():
    m = _map_with_keyframe()
    img = np.zeros((H, W, 3), np.uint8)
    m.add_frame(FrameState(keyframe=0, rel_cw=_pose(1.0)), img)  # frame 1 tracked at x = 1
    for _ in range(2):  # frames 2, 3 lost
        m.add_frame(FrameState(keyframe=0, rel_cw=_pose(1.0), lost=True), img)
    m.add_frame(FrameState(keyframe=0, rel_cw=_pose(1.0), lost=True), img)
    seg = m.new_segment()
    m.add_keyframe(Keyframe(frame=4, pose_cw=_pose(0.0), image=img, depth=torch.ones(H, W),
                            valid=torch.ones(H, W, dtype=torch.bool), segment=seg), 4)  # a restart at frame 4
    assert not m.frame(4).lost  # the segment's origin has a pose
    m.add_frame(FrameState(keyframe=1, rel_cw=_pose(0.5)), img)
    assert m.bridge(5) == [] and m.bridge(4) == [] and m.frame(2).lost and m.frame(3).lost
    # merged: the new segment's world is the old one's shifted by x = 4 (frame 4 at x = 4)
    m.merge_segment(seg, 0, torch.eye(3, dtype=torch.float64), torch.tensor([-4.0, 0.0, 0.0], dtype=torch.float64),
                    1.0)
    assert torch.allclose(m.frame_pose(4), _pose(4.0), atol=1e-9)
    assert m.bridge(4) == [2, 3]
    for f, x in ((2, 2.0), (3, 3.0)):
        assert torch.allclose(m.frame_pose(f), _pose(x), atol=1e-9) and m.frame(f).interpolated


def test_merging_a_segment_applies_the_similarity_to_poses_depths_and_frames():
    """Segment 1 is the world of segment 0 seen through a similarity (scale 0.5): merging with that
    similarity gives back segment-0 poses, depths at segment 0's scale, and frames that follow."""
    m = _map_with_keyframe()
    img = np.zeros((H, W, 3), np.uint8)
    true_kf = se3_exp(torch.tensor([0.3, -0.2, 1.0, 0.1, 0.4, -0.2], dtype=torch.float64))
    true_frame = se3_exp(torch.tensor([0.5, 0.1, 1.2, 0.2, 0.3, -0.1], dtype=torch.float64))
    # the segment's world: X_seg = G^-1(X) with G(X) = s R X + t
    s, R = 2.0, quat_to_matrix(se3_exp(torch.tensor([0, 0, 0, 0.3, -0.5, 0.2], dtype=torch.float64))[3:])
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def in_segment(pose):  # camera of `pose` in the segment's world, at the segment's scale (1 / s)
        Rk = quat_to_matrix(pose[3:]) @ R
        return torch.cat([(pose[:3] + quat_to_matrix(pose[3:]) @ t) / s, matrix_to_quat(Rk)])

    m.add_frame(FrameState(keyframe=0, rel_cw=se3_identity(dtype=torch.float64), lost=True), img)
    seg = m.new_segment()
    m.add_keyframe(Keyframe(frame=1, pose_cw=in_segment(true_kf), image=img, depth=torch.full((H, W), 0.5),
                            valid=torch.ones(H, W, dtype=torch.bool), segment=seg), 1)
    m.add_frame(FrameState(keyframe=1, rel_cw=se3_mul(in_segment(true_frame), se3_inv(in_segment(true_kf)))), img)
    assert len(m.segments()) == 2
    m.merge_segment(seg, 0, R, t, s)
    assert list(m.segments()) == [0]
    assert torch.allclose(m.keyframe(1).pose_cw[:3], true_kf[:3], atol=1e-9)
    assert torch.allclose(quat_to_matrix(m.keyframe(1).pose_cw[3:]), quat_to_matrix(true_kf[3:]), atol=1e-9)
    assert torch.allclose(m.keyframe(1).depth, torch.full((H, W), 1.0))
    assert torch.allclose(m.frame_pose(2)[:3], true_frame[:3], atol=1e-9)
    assert torch.allclose(m.keyframe(0).pose_cw, se3_identity(dtype=torch.float64))  # segment 0 untouched
